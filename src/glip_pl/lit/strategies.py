"""Distribution strategies for GLIP in one place (DESIGN.md practice 10): FSDP wrap policy and activation
checkpointing per GLIP block. Nothing in ``glip_pl.model`` knows which strategy runs it.

The FSDP units are the blocks that repeat: a Swin block, a BERT layer (encoder and the head's extra layers), a
fusion block and a DyHead block. Recipes select this with ``trainer.strategy.class_path:
glip_pl.lit.strategies.GLIPFSDPStrategy``.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy


def glip_block_classes() -> set:
    """The module classes wrapped as FSDP units (and checkpointed when asked)."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from transformers.models.bert.modeling_bert import BertLayer

    from glip_pl.model.dyhead import DyHeadBlock
    from glip_pl.model.fusion import BiAttentionFusion
    from glip_pl.model.text_layer import TextLayer

    return {SwinTransformerBlock, BertLayer, TextLayer, BiAttentionFusion, DyHeadBlock}


class GLIPFSDPStrategy(FSDPStrategy):
    """FSDP with one unit per Swin block / BERT layer / fusion block / DyHead block.

    ``checkpoint_blocks``: activation checkpointing of the same blocks (trading compute for memory);
    ``sharding_strategy`` and ``state_dict_type`` as Lightning's (sharded checkpoints during training; export a
    full one with ``glip-pl export`` / ``state_dict_type: full``).
    """

    def __init__(self, checkpoint_blocks: bool = False, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", **kwargs):
        blocks = glip_block_classes()
        super().__init__(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if checkpoint_blocks else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )
