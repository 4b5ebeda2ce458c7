"""Generator of the bundled image sample under data/sample_vision/ (synthetic figures, PMC-VQA v2 format).

The task can only be solved by looking: every row asks for the colour of the square drawn on a noisy
figure; the caption and question are the same for every colour.
"""
from __future__ import annotations

# name -> RGB. Distinct hues, so the task is about reading the figure, not fine colour judgement.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220),
    "yellow": (235, 220, 40), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
QUESTIONS = ["What colour is the square in the figure?", "Which colour does the square have?",
             "The square shown in this image is which colour?"]
CAPTION = "A synthetic figure: one coloured square on a noisy gray background."


def all_text() -> list[str]:
    """Every string the sample's CSVs can hold (for the tiny vision tokenizer)."""
    return QUESTIONS + [CAPTION] + [name.capitalize() for name in COLOURS] + list(COLOURS)
