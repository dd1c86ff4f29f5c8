"""Skip and fault counters of the streaming pipeline, the error that stops a stream, and its message.

Counter names (:data:`STAT_KEYS`, a fixed order so that ranks can all-reduce a vector of them):

* sample skips (:data:`SAMPLE_SKIP_REASONS`), one per skipped sample: ``bad_json``, ``not_an_object``,
  ``missing_key``, the conversation problems of :func:`mole_ds.data.conversation.conversation_problem`,
  ``bad_image``, ``tokenization_mismatch``, ``image_truncated``, ``no_supervised_tokens``, ``unknown_domain``;
* shard faults (:data:`SHARD_FAULTS`), one per shard: ``corrupt_shard`` (bytes that do not parse as a tar;
  the rest of the shard is skipped), ``short_shard`` (fewer samples than the manifest says);
* ``samples_read``: samples examined on the first pass over a reader's shards (the denominator of the skip
  fraction); ``samples_lost``: samples the manifest promised in corrupt or short shards that were not read;
  ``repeated``: samples re-read to pad a reader's last batches (exact epochs; not a skip).

Each sample and shard is counted once per epoch (on the first pass); padding passes do not count again.
"""

from __future__ import annotations

import logging
from typing import Mapping

log = logging.getLogger(__name__)

CONVERSATION_REASONS = (
    "malformed_conversation", "unknown_role", "bad_turn_order", "no_assistant_turn", "placeholder_in_reply",
    "multiple_placeholders", "placeholder_without_image", "image_without_placeholder",
)
SAMPLE_SKIP_REASONS = (
    ("bad_json", "not_an_object", "missing_key") + CONVERSATION_REASONS
    + ("bad_image", "tokenization_mismatch", "image_truncated", "no_supervised_tokens", "unknown_domain")
)
SHARD_FAULTS = ("corrupt_shard", "short_shard")
COUNTERS = ("samples_read", "samples_lost", "repeated")
STAT_KEYS = SAMPLE_SKIP_REASONS + SHARD_FAULTS + COUNTERS

# Checked once this many samples were read (and at the end of every first pass), so that a single bad sample
# at the start of a large dataset does not stop the run on a tiny denominator.
MIN_SAMPLES_FOR_FRACTION = 1000

_FIXES = {
    "image_truncated": "raise data.max_length: image samples do not fit ({detail})",
    "no_supervised_tokens": "raise data.max_length: the prompt fills it before the first answer ({detail})",
    "tokenization_mismatch": "use a fast tokenizer (it has offsets and never mismatches), or data.mismatch_policy "
                             "'skip' to train without these samples",
    "bad_image": "the shards hold images that do not decode: run tools/shard_data.py --verify on them",
    "corrupt_shard": "shard files are damaged: run tools/shard_data.py --verify and re-shard",
    "short_shard": "shards hold fewer samples than their manifest: run tools/shard_data.py --verify and re-shard",
    "unknown_domain": "the shards' domains are missing from data.domain_names",
}
_MALFORMED_FIX = "the shards hold malformed records: re-shard with tools/shard_data.py (it drops and lists them)"


class DataStreamError(RuntimeError):
    """The data stream cannot go on: a full pass gave no usable sample, or too many samples were skipped.

    The message gives the skip counts per reason and the likely fix.
    """


def skipped_samples(stats: Mapping[str, int]) -> int:
    """Samples lost to skips: every sample skip reason plus samples of corrupt/short shards."""
    return sum(int(stats.get(k, 0)) for k in SAMPLE_SKIP_REASONS) + int(stats.get("samples_lost", 0))


def format_counts(stats: Mapping[str, int]) -> str:
    """'image_truncated 24, corrupt_shard 1 (shards); 30 samples read' (zero counters left out)."""
    parts = [f"{k} {int(stats[k])}" for k in SAMPLE_SKIP_REASONS if stats.get(k)]
    parts += [f"{k} {int(stats[k])} (shards, {int(stats.get('samples_lost', 0))} samples lost)"
              if k == "corrupt_shard" else f"{k} {int(stats[k])} (shards)" for k in SHARD_FAULTS if stats.get(k)]
    parts += [f"{k} {int(stats[k])}" for k in stats if k not in STAT_KEYS and stats.get(k)]  # unknown names too
    return (", ".join(parts) or "no skips") + f"; {int(stats.get('samples_read', 0))} samples read"


def likely_fixes(stats: Mapping[str, int], examples: Mapping[str, str] | None = None) -> list[str]:
    """One hint per reason present, most frequent first; examples[reason] = a detail of one such skip."""
    examples = examples or {}
    reasons = sorted((k for k in (*SAMPLE_SKIP_REASONS, *SHARD_FAULTS) if stats.get(k)), key=lambda k: -stats[k])
    out, malformed = [], False
    for k in reasons:
        if k in _FIXES:
            out.append(f"{k}: " + _FIXES[k].format(detail=examples.get(k, "see the log")))
        elif not malformed:
            malformed = True
            out.append(f"{k}: " + _MALFORMED_FIX)
    return out


def describe(stats: Mapping[str, int], examples: Mapping[str, str] | None = None) -> str:
    """Counts plus likely fixes plus one example per reason, for error messages."""
    lines = [f"skipped: {format_counts(stats)}"]
    lines += [f"likely fix - {h}" for h in likely_fixes(stats, examples)]
    lines += [f"e.g. {k}: {v}" for k, v in (examples or {}).items() if stats.get(k)]
    return "\n  ".join(lines)


def check_skip_fraction(stats: Mapping[str, int], max_fraction: float, where: str, *, final: bool = False,
                        examples: Mapping[str, str] | None = None) -> str | None:
    """Stop (DataStreamError) when skipped / examined > max_fraction; return a warning text from half of it.

    Checked when at least MIN_SAMPLES_FOR_FRACTION samples were examined, or always when `final` (the end of a
    pass or epoch).  The train loop may call it with counts all-reduced over ranks.
    """
    skipped = skipped_samples(stats)
    examined = int(stats.get("samples_read", 0)) + int(stats.get("samples_lost", 0))
    if examined == 0 or skipped == 0 or (examined < MIN_SAMPLES_FOR_FRACTION and not final):
        return None
    frac = skipped / examined
    text = (f"{where}: {skipped} of {examined} samples skipped ({100 * frac:.2f}%, data.max_skip_fraction "
            f"{100 * max_fraction:g}%)")
    if frac > max_fraction:
        raise DataStreamError(f"{text}; stopping rather than training on a different dataset than asked for "
                              "(raise data.max_skip_fraction to accept it)\n  " + describe(stats, examples))
    if frac > max_fraction / 2:
        return f"{text}: close to the limit; {format_counts(stats)}"
    return None
