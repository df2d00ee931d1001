"""Does attention explain a model's output? Faithfulness tests for a trained classifier
(:mod:`qkv.interpret.faithfulness`), cross-attention against gold alignments
(:mod:`qkv.interpret.alignment`) and a pretrained encoder's attention drawn
(:mod:`qkv.interpret.pictures`). Importing this package loads neither matplotlib nor the data
sets; the functions take a model and token ids (or a text)."""

from qkv.interpret.faithfulness import (
    FaithfulnessReport,
    adversarial_attention,
    attention_gradient_importance,
    attention_importance,
    faithfulness_report,
    gradient_importance,
    integrated_gradients,
    kendall_tau,
    leave_one_out,
    permutation_test,
    rollout_importance,
)
from qkv.interpret.pictures import pretrained_pictures

__all__ = [
    "FaithfulnessReport",
    "adversarial_attention",
    "attention_gradient_importance",
    "attention_importance",
    "faithfulness_report",
    "gradient_importance",
    "integrated_gradients",
    "kendall_tau",
    "leave_one_out",
    "permutation_test",
    "pretrained_pictures",
    "rollout_importance",
]
