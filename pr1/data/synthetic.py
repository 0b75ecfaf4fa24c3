"""Synthetic image problems with numeric answers and visual annotations, for the debug mode and tests.

`python -m pr1.data.synthetic --out FILE [--n N --seed S --task T --image_size PX]` writes a parquet
file in the Perception-R1 / EasyR1 layout that `pr1.data.dataset` reads: `problem` ("<image>" +
question), `answer` (a number as a string), `images` (one {bytes: PNG, path} struct), and
`visual_key_info` (`<info1>..</info1><info2>..</info2>` atomic visual facts, the form the judge
examples use), plus a `task` column. Images are drawn with PIL and small (56 px by default: 4 visual
tokens with Qwen2.5-VL's 28-px merged patches). Row i depends only on (seed, i), so files are
deterministic per seed and a larger n extends a smaller one.

Tasks:
  color   one shape whose colour gives the answer (red 1, green 2, blue 3): a 3-answer
          vocabulary decided by one visible attribute. (Its annotation "the shape is red" is
          judged by the lexical judge on the word "shape" only: "red" is too short a word for it.)
  count   1-3 red shapes among 0-2 blue ones; answer the number of red shapes.
  length  a segment AB labelled with its length; answer AB, 2·AB or AB + 3.
  angle   an angle ABC labelled in degrees; answer its supplement.
  dots    1-3 red dots, one per 28-px quadrant of the image; answer how many. The annotation
          "there are N dots" is checked by the lexical judge through the number N alone, so
          stating the count is the perception reward. The debug run's task.
  mix     each row picks one of color, count, length, angle.
"""

from __future__ import annotations

import io
import math
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from pr1 import cli

TASKS = ("color", "count", "length", "angle", "dots")
# What "mix" draws from: the original four, so that mixed files of a seed stay what they were.
MIX_TASKS = ("color", "count", "length", "angle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220)}
COLOR_ANSWERS = {"red": 1, "green": 2, "blue": 3}
KINDS = ("circle", "square", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _place(rng: np.random.Generator, size: int, r: float, n: int) -> list[tuple[float, float]]:
    """n centres at least 2r + 2 px apart inside the image (rejection sampling, deterministic per rng)."""
    for _ in range(200):
        pts = [tuple(rng.uniform(r + 1, size - r - 1, 2)) for _ in range(n)]
        if all(math.dist(a, b) >= 2 * r + 2 for i, a in enumerate(pts) for b in pts[i + 1 :]):
            return pts
    raise ValueError(
        f"cannot place {n} shapes of radius {r:.1f} in a {size}px image; use a larger --image_size"
    )


def _font(size: int):
    # Pillow's built-in font: no font files needed (it renders the same within one Pillow install).
    try:
        return ImageFont.load_default(size=max(8, size // 6))
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _info(facts: list[str]) -> str:
    return "".join(f"<info{k}>{fact}</info{k}>" for k, fact in enumerate(facts, 1))


def _color(rng, size):
    image = Image.new("RGB", (size, size), "white")
    color = list(COLORS)[rng.integers(3)]
    kind = KINDS[rng.integers(3)]
    r = rng.uniform(0.2, 0.35) * size
    ((cx, cy),) = _place(rng, size, r, 1)
    _draw_shape(ImageDraw.Draw(image), kind, cx, cy, r, COLORS[color])
    question = "What color is the shape? Answer 1 for red, 2 for green, 3 for blue."
    return image, question, str(COLOR_ANSWERS[color]), [f"the shape is {color}", f"the shape is a {kind}"]


def _count(rng, size):
    image = Image.new("RGB", (size, size), "white")
    n_red, n_blue = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    r = size / 11
    draw = ImageDraw.Draw(image)
    for k, (cx, cy) in enumerate(_place(rng, size, r, n_red + n_blue)):
        _draw_shape(draw, "circle", cx, cy, r, COLORS["red" if k < n_red else "blue"])
    facts = [f"there {'is' if n_red == 1 else 'are'} {n_red} red circle{'s' * (n_red != 1)}"]
    if n_blue:
        facts.append(f"there {'is' if n_blue == 1 else 'are'} {n_blue} blue circle{'s' * (n_blue != 1)}")
    return image, "How many red circles are there?", str(n_red), facts


def _length(rng, size):
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    length = int(rng.integers(2, 10))
    y = size * 0.65
    x0, x1 = size * 0.12, size * 0.88
    draw.line((x0, y, x1, y), fill="black", width=max(1, size // 40))
    font = _font(size)
    draw.text((x0 - size * 0.1, y + 2), "A", fill="black", font=font)
    draw.text((x1, y + 2), "B", fill="black", font=font)
    draw.text((size * 0.38, y - size * 0.3), str(length), fill="black", font=font)
    ask = int(rng.integers(3))
    question, answer = [
        ("What is the length of AB?", length),
        ("What is twice the length of AB?", 2 * length),
        ("What is the length of AB plus 3?", length + 3),
    ][ask]
    return image, question, str(answer), [f"AB = {length}"]


def _angle(rng, size):
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    degrees = int(rng.integers(2, 17)) * 10  # 20..160
    bx, by = size * 0.2, size * 0.75
    arm = size * 0.65
    ax, ay = bx + arm, by  # BA along the x axis
    cx = bx + arm * math.cos(math.radians(degrees))
    cy = by - arm * math.sin(math.radians(degrees))
    if cx < 2:  # obtuse angles: move the vertex right so C stays inside
        shift = 2 - cx
        bx, ax, cx = bx + shift, min(ax + shift, size - 2), cx + shift
    width = max(1, size // 40)
    draw.line((bx, by, ax, ay), fill="black", width=width)
    draw.line((bx, by, cx, cy), fill="black", width=width)
    ar = size * 0.12
    draw.arc((bx - ar, by - ar, bx + ar, by + ar), start=-degrees, end=0, fill="black")
    font = _font(size)
    draw.text((bx - size * 0.12, by), "B", fill="black", font=font)
    draw.text((min(ax, size - size * 0.1), by + 2), "A", fill="black", font=font)
    draw.text((cx, max(0, cy - size * 0.12)), "C", fill="black", font=font)
    mid = math.radians(degrees / 2)
    draw.text(
        (bx + ar * 1.3 * math.cos(mid), by - ar * 1.3 * math.sin(mid) - size * 0.1),
        str(degrees),
        fill="black",
        font=font,
    )
    question = "Angle ABC is labelled in degrees. What is the measure of its supplement, in degrees?"
    return image, question, str(180 - degrees), [f"angle ABC is {degrees} degrees"]


def _dots(rng, size):
    image = Image.new("RGB", (size, size), "white")
    n = int(rng.integers(1, 4))
    # One dot in each of n of the 4 quadrants, all red, of one size: at 56 px a quadrant is one
    # merged 28-px visual token of Qwen2.5-VL, so the count is a sum over visual tokens of a feature
    # ("is there red here") that a tiny random-init vision tower finds within minutes.
    cell = size / 2
    r = cell * 0.3
    draw = ImageDraw.Draw(image)
    for q in rng.permutation(4)[:n]:
        cx, cy = (
            (q % 2) * cell + rng.uniform(r + 1, cell - r - 1),
            (q // 2) * cell + rng.uniform(r + 1, cell - r - 1),
        )
        _draw_shape(draw, "circle", cx, cy, r, COLORS["red"])
    # Worded so the lexical judge checks the number only ("circle" would also demand that word).
    fact = "there is 1 dot" if n == 1 else f"there are {n} dots"
    return image, "How many dots?", str(n), [fact]


_MAKERS = {"color": _color, "count": _count, "length": _length, "angle": _angle, "dots": _dots}


def make_row(task: str, seed: int, index: int, image_size: int = 56) -> dict:
    """Row `index` of a synthetic file: {problem, answer, images, visual_key_info, task}."""
    rng = np.random.default_rng([seed, index])
    if task == "mix":
        task = MIX_TASKS[rng.integers(len(MIX_TASKS))]
    if task not in _MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS + ('mix',)}")
    image, question, answer, facts = _MAKERS[task](rng, int(image_size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {
        "problem": "<image>" + question,
        "answer": answer,
        "images": [{"bytes": buf.getvalue(), "path": f"{task}_{index:06d}.png"}],
        "visual_key_info": _info(facts),
        "task": task,
    }


SCHEMA = pa.schema(
    [
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("visual_key_info", pa.string()),
        ("task", pa.string()),
    ]
)


def write_synthetic(
    out: str | os.PathLike, n: int = 256, seed: int = 0, task: str = "color", image_size: int = 56
) -> str:
    """Write n rows of `task` to the parquet file `out` (parent dirs created) and return its path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28 px (one merged patch), got {image_size}")
    rows = [make_row(task, seed, i, image_size) for i in range(n)]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out)  # never leave a half-written file where a later run would find it
    return out


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "parquet file to write", flag_values=fv)
    flags.DEFINE_integer("n", 256, "number of rows", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the rows", flag_values=fv)
    flags.DEFINE_enum("task", "color", [*TASKS, "mix"], "the question every row asks", flag_values=fv)
    flags.DEFINE_integer("image_size", 56, "square image side in pixels", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)


def main(argv=None) -> int:
    args = cli.parse("pr1.data.synthetic", argv, define_flags, doc=__doc__)
    path = write_synthetic(args.out, n=args.n, seed=args.seed, task=args.task, image_size=args.image_size)
    print(f"wrote {args.n} '{args.task}' rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
