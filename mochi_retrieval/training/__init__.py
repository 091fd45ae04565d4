"""The training program, on top of the library: ``python -m mochi_retrieval.train`` runs :func:`run`.

- :mod:`~mochi_retrieval.training.runner`: one run for any modality (accelerator, recipe, loop, results);
- :mod:`~mochi_retrieval.training.recipe`: the :class:`Recipe` interface (data, model, evaluation, export)
  and what both modalities share (loop settings, resume fingerprint);
- :mod:`~mochi_retrieval.training.image` and :mod:`~mochi_retrieval.training.text`: the two recipes and
  their builders;
- :mod:`~mochi_retrieval.training.loop`: the accelerate training loop (:class:`Trainer`);
- :mod:`~mochi_retrieval.training.checkpoints`: atomic checkpoint files and RNG state;
- :mod:`~mochi_retrieval.training.plots`: training curves.

The names below are the program's public entry points (the benchmarks use them).
"""
from .image import Evaluator as ImageEvaluator
from .image import ImageRecipe, build_data, build_model
from .loop import Trainer, TrainerSettings, make_optimizer, param_groups
from .recipe import Recipe, fingerprint, recipe_for, settings_from
from .runner import run
from .text import (
    TextEvaluator,
    TextRecipe,
    build_encoder,
    build_text_data,
    build_text_model,
    load_pairs,
    resolve_model_path,
)

__all__ = [
    "ImageEvaluator", "ImageRecipe", "Recipe", "TextEvaluator", "TextRecipe", "Trainer", "TrainerSettings",
    "build_data", "build_encoder", "build_model", "build_text_data", "build_text_model", "fingerprint", "load_pairs",
    "make_optimizer", "param_groups", "recipe_for", "resolve_model_path", "run", "settings_from",
]
