"""pr1.data.synthetic: the files load through the dataset, answers are numbers consistent with the
drawn facts, and files are deterministic per seed."""

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pr1.data import config as data_config_lib
from pr1.data import dataset as D
from pr1.data import rows as data_rows
from pr1.data import synthetic as S
from pr1.data.processor import Processor
from pr1.models.tiny import write_tiny_checkpoint

NUMBER = re.compile(r"-?\d+(\.\d+)?")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_dir(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("task", S.TASKS + ("mix",))
def test_synthetic_file_loads_through_the_dataset(tmp_path, processor, task):
    path = S.write_synthetic(tmp_path / f"{task}.parquet", n=8, seed=3, task=task, image_size=56)
    cfg = data_config_lib.data_config()
    cfg.val_files, cfg.prompts_per_step = [path], 8
    (batch,) = list(D.val_iterator(cfg, processor, process_index=0, process_count=1))
    assert len(batch) == 8
    for e in batch:
        assert NUMBER.fullmatch(e.answer), e.answer
        assert e.annotations and all(isinstance(a, str) and a for a in e.annotations)
        assert e.images[0].shape == (56, 56, 3)
        assert e.prompt.image_grid_thw.tolist() == [[1, 4, 4]]  # 56 px: 4 visual tokens
        assert len(e.prompt.input_ids) < 260  # the tiny tokenizer spends ~170 on the instruction


def test_answers_match_the_visual_facts():
    for r in [S.make_row("mix", seed=0, index=i) for i in range(40)] + [
        S.make_row("dots", 0, i) for i in range(20)
    ]:
        facts = data_rows.parse_annotations(r["visual_key_info"])
        answer = int(r["answer"])
        image = np.asarray(Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB"))
        assert r["problem"].startswith("<image>") and r["images"][0]["path"].endswith(".png")
        if r["task"] == "color":
            colored = image[(image.max(-1) - image.min(-1)) > 100]
            dominant = ["red", "green", "blue"][int(np.argmax(colored.mean(0)))]
            assert answer == S.COLOR_ANSWERS[dominant] and facts[0] == f"the shape is {dominant}"
        elif r["task"] == "count":
            assert answer in (1, 2, 3) and re.match(rf"there (is|are) {answer} red circle", facts[0])
        elif r["task"] == "dots":
            red = (image[..., 0] > 150) & (image[..., 1] < 100)
            quadrants = [red[y : y + 28, x : x + 28].any() for y in (0, 28) for x in (0, 28)]
            assert answer == sum(quadrants) and re.fullmatch(rf"there (is|are) {answer} dots?", facts[0])
        elif r["task"] == "length":
            length = int(re.fullmatch(r"AB = (\d+)", facts[0]).group(1))
            q = r["problem"]
            assert answer == (2 * length if "twice" in q else length + 3 if "plus 3" in q else length)
        else:
            degrees = int(re.fullmatch(r"angle ABC is (\d+) degrees", facts[0]).group(1))
            assert answer + degrees == 180


def test_dots_fact_is_what_the_lexical_judge_checks():
    """The debug task's annotation is judged present exactly when the response states the count."""
    from pr1.rewards.judge import LexicalJudge

    for i in range(12):
        r = S.make_row("dots", 0, i)
        (fact,) = data_rows.parse_annotations(r["visual_key_info"])
        n = int(r["answer"])
        assert LexicalJudge.verdict(f"I see {n} of them, so {n}", fact) == 1.0
        assert LexicalJudge.verdict(f"{n % 3 + 1}", fact) == 0.0
        assert LexicalJudge.verdict("there are dots", fact) == 0.0


def test_easiest_task_has_a_tiny_answer_vocabulary():
    answers = {S.make_row("color", 0, i)["answer"] for i in range(60)}
    assert answers == {"1", "2", "3"}


def test_deterministic_per_seed(tmp_path):
    a = pq.read_table(S.write_synthetic(tmp_path / "a.parquet", n=6, seed=7, task="mix"))
    b = pq.read_table(S.write_synthetic(tmp_path / "b.parquet", n=6, seed=7, task="mix"))
    c = pq.read_table(S.write_synthetic(tmp_path / "c.parquet", n=6, seed=8, task="mix"))
    longer = pq.read_table(S.write_synthetic(tmp_path / "d.parquet", n=9, seed=7, task="mix"))
    assert a.equals(b) and not a.equals(c)
    assert longer.slice(0, 6).equals(a)


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.parquet"
    assert (
        S.main(["--out", str(out), "--n", "5", "--seed", "1", "--task", "count", "--image_size", "84"]) == 0
    )
    table = pq.read_table(out)
    assert table.num_rows == 5 and table.column_names[:4] == [
        "problem",
        "answer",
        "images",
        "visual_key_info",
    ]
    assert set(table.column("task").to_pylist()) == {"count"}
    assert "wrote 5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown synthetic task"):
        S.write_synthetic(tmp_path / "x.parquet", n=1, task="nope")
