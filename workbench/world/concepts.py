"""The miniature world's concepts, modalities and vocabulary.

Twelve concepts exist in four modalities (image, audio, video, point cloud). Each modality renders
a *scene*: an ordered set of up to four slots, each empty or holding one concept. The same concept
looks different in every modality (see :mod:`workbench.world.generators`). The capability family
(VQA, Geometry, Chart, OCR, Grounding) uses its own words (colours, shapes, digits, positions).
"""
from __future__ import annotations

CONCEPTS: tuple[str, ...] = (
    "apple", "bell", "cat", "drum", "eagle", "flute",
    "goat", "horn", "kite", "lamp", "moon", "rose",
)
N_CONCEPTS = len(CONCEPTS)
N_SLOTS = 4

MODALITIES: tuple[str, ...] = ("image", "audio", "video", "point")
PLACEHOLDERS: dict[str, str] = {m: f"<{m}>" for m in MODALITIES}
# MCUB records name the image input "vision" (methods.md section 5)
RECORD_KEYS: dict[str, str] = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}
RECORD_KEY_TO_MODALITY: dict[str, str] = {v: k for k, v in RECORD_KEYS.items()}

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")

# ---- capability family words
CAP_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
CAP_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CAP_SIDES: tuple[str, ...] = ("three", "four", "five", "six")
CAP_VALUES: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven")
CAP_CHARS: tuple[str, ...] = tuple("0123456789")
CAP_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
CAP_COLS: tuple[str, ...] = ("left", "center", "right")
CAP_TASKS: tuple[str, ...] = ("vqa", "geometry", "chart", "ocr", "grounding")

TEMPLATE_WORDS = (
    "image video audio point text what is in the input which of these is not how many things are "
    "thing do all inputs have common comes first last answer color does shape sides value bar "
    "say where polygon chart objects empty letter"
).split()

# content words used by the text-only pretraining (copy and commonality over word lists)
CONTENT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    CONCEPTS + CAP_COLORS + CAP_SHAPES + CAP_VALUES + CAP_CHARS + CAP_ROWS + CAP_COLS
))

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>") + tuple(PLACEHOLDERS.values())
PUNCT: tuple[str, ...] = (":", ".", "?", ",")


def vocabulary() -> list[str]:
    """All tokens of the world's word-level vocabulary, specials first, deterministic order."""
    words: list[str] = list(SPECIAL_TOKENS) + list(PUNCT) + list(LETTERS)
    for w in list(CONTENT_WORDS) + list(COUNT_WORDS) + TEMPLATE_WORDS:
        if w not in words:
            words.append(w)
    return words
