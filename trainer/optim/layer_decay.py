"""Layer-wise decayed learning rates (paper Table 4): layer l of L gets lr·ξ^(L−l), embeddings lr·ξ^L,
everything above the last layer (pooler, task heads) the base lr.

Depth is found from the module tree, not from parameter-name patterns: the encoder's block list is the
ModuleList holding `num_hidden_layers` blocks; the rest of the encoder is embeddings, except its pooler.
So it works for any BERT-family encoder (BERT, RoBERTa, ELECTRA, DeBERTa, MiniLM …)."""
from __future__ import annotations

from torch import nn


def _block_list(encoder: nn.Module, num_layers: int) -> nn.ModuleList:
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise ValueError(f"cannot find the {num_layers} transformer blocks of {type(encoder).__name__}")
    return lists[0]


def parameter_depths(model: nn.Module, encoder: nn.Module) -> tuple[dict[str, int], int]:
    """{parameter name in `model`: depth} with 0 = embeddings, 1..L = blocks, L+1 = above the encoder.

    Encoder parameters outside the blocks — embeddings, ELECTRA's embedding projection, DeBERTa's shared
    relative-position tables — count as embeddings; the pooler and everything outside the encoder (task heads)
    get the base lr."""
    num_layers = encoder.config.num_hidden_layers
    depth_of_param = {id(p): 0 for p in encoder.parameters()}
    for i, block in enumerate(_block_list(encoder, num_layers)):
        for p in block.parameters():
            depth_of_param[id(p)] = i + 1
    pooler = getattr(encoder, "pooler", None)
    for p in pooler.parameters() if isinstance(pooler, nn.Module) else []:
        depth_of_param[id(p)] = num_layers + 1
    return {name: depth_of_param.get(id(p), num_layers + 1) for name, p in model.named_parameters()}, num_layers


def depth_name(depth: int, num_layers: int) -> str:
    return "embeddings" if depth == 0 else "head" if depth > num_layers else f"layer_{depth}"


def layer_decay_scales(model: nn.Module, encoder: nn.Module, xi: float):
    """(lr_scale(name), part(name)) for `build_param_groups`."""
    depths, num_layers = parameter_depths(model, encoder)

    def scale(name: str) -> float:
        d = depths[name]
        return 1.0 if d > num_layers else xi ** (num_layers - d)

    return scale, lambda name: depth_name(depths[name], num_layers)
