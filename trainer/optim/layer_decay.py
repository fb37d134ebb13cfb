"""Layer-wise decayed learning rates (paper Table 4): layer l of L gets lr·ξ^(L−l), embeddings lr·ξ^L,
everything above the last layer (pooler, task heads) the base lr.

Depth is found from the module tree, not from parameter-name patterns: the encoder's block list is the
ModuleList holding `num_hidden_layers` blocks; the rest of the encoder is embeddings, except its pooler.
So it works for any BERT-family encoder (BERT, RoBERTa, ELECTRA, DeBERTa, MiniLM …).

Shared-layer encoders (ALBERT) apply `num_hidden_groups` blocks (usually one) `num_hidden_layers` times: the
depths are those of the distinct blocks, so L = `num_hidden_groups` — with one shared block the block gets
lr·ξ⁰ = lr and the embeddings lr·ξ — since a weight used at every depth cannot take one lr per depth."""
from __future__ import annotations

from torch import nn

from ..errors import UserError


def _block_list(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's distinct transformer blocks: `num_hidden_layers` of them, or `num_hidden_groups` shared ones."""
    conf = encoder.config
    for count in (conf.num_hidden_layers, getattr(conf, "num_hidden_groups", None)):
        lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
        if lists:
            return lists[0]
    raise UserError(f"cannot find the {conf.num_hidden_layers} transformer blocks of {type(encoder).__name__} "
                    f"(layer-wise learning rates need them)")


def parameter_depths(model: nn.Module, encoder: nn.Module) -> tuple[dict[str, int], int]:
    """{parameter name in `model`: depth} with 0 = embeddings, 1..L = blocks, L+1 = above the encoder.

    Encoder parameters outside the blocks — embeddings, ELECTRA's and ALBERT's embedding projection, DeBERTa's
    shared relative-position tables — count as embeddings; the pooler and everything outside the encoder (task
    heads) get the base lr. L is the number of distinct blocks (see the module docstring for shared layers)."""
    blocks = _block_list(encoder)
    num_layers = len(blocks)
    depth_of_param = {id(p): 0 for p in encoder.parameters()}
    for i, block in enumerate(blocks):
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
