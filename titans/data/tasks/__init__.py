"""Long-context and recall task generators: S-NIAH (RULER style), BABILong-style QA, MQAR,
copy and selective copy. See docs/long_context.md."""

from .babilong import (BABILONG_TASKS, BabilongGenerator, BabilongSample, Story, babilong_batch,
                       babilong_batches, simulate_story)
from .common import TaskBatches, normalize_answer, parse_length, parse_lengths, score_answer
from .niah import NIAH_TASKS, NiahGenerator, NiahSample, make_niah_sample
from .recall import (RECALL_TASKS, copy_batch, evaluate_recall, masked_accuracy, mqar_batch, passkey_batch,
                     recall_batches, selective_copy_batch, task_arguments)

__all__ = ["NIAH_TASKS", "NiahGenerator", "NiahSample", "make_niah_sample",
           "BABILONG_TASKS", "BabilongGenerator", "BabilongSample", "Story", "simulate_story",
           "babilong_batch", "babilong_batches",
           "RECALL_TASKS", "mqar_batch", "copy_batch", "selective_copy_batch", "passkey_batch", "masked_accuracy",
           "recall_batches", "evaluate_recall", "task_arguments",
           "TaskBatches", "normalize_answer", "score_answer", "parse_length", "parse_lengths"]
