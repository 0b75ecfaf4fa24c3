"""pr1.data.dataset: prompt building, annotation forms, deterministic shuffling and sharding, exact
resume from iterator state, long-prompt filtering and bad rows (named errors, or skipped and counted)."""

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pr1.data import config as data_config_lib
from pr1.data import dataset as D
from pr1.data import prompts as data_prompts
from pr1.data import rows as data_rows
from pr1.data.processor import Processor
from pr1.models.generation import IMAGE_PAD
from pr1.models.tiny import write_tiny_checkpoint

COLORS = [(200, 0, 0), (0, 150, 0), (0, 0, 200), (120, 120, 0)]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_dir(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def png(k: int, size: int = 56) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLORS[k % len(COLORS)]).save(buf, format="PNG")
    return buf.getvalue()


def row(i: int, **overrides) -> dict:
    r = {
        "problem": f"<image>Question number {i}: what is {i} + 1?",
        "answer": str(i + 1),
        "images": [{"bytes": png(i), "path": None}],
        "visual_key_info": f"<info1>fact {i}</info1><info2>more {i}</info2>",
    }
    r.update(overrides)
    return r


def write(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def config(**overrides):
    cfg = data_config_lib.data_config()
    cfg.prompts_per_step = 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def uids(batches):
    return [[e.uid for e in b] for b in batches]


def take(it, k):
    return [next(it) for _ in range(k)]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data") / "twelve.parquet", [row(i) for i in range(12)])


# ---- annotations and prompt text ----------------------------------------------------------------


def test_parse_annotations_forms():
    assert data_rows.parse_annotations(None) == []
    assert data_rows.parse_annotations("") == []
    assert data_rows.parse_annotations([]) == []
    assert data_rows.parse_annotations(["AB = 5", " ", "angle B is 30 degrees "]) == [
        "AB = 5",
        "angle B is 30 degrees",
    ]
    assert data_rows.parse_annotations("<info1>AB = 5</info1><info2> x < 3 </info2>") == ["AB = 5", "x < 3"]
    assert data_rows.parse_annotations("<info1>a</info1>\n<info2>b</info2>, <info3>c</info3>") == [
        "a",
        "b",
        "c",
    ]
    assert data_rows.parse_annotations("one plain fact") == ["one plain fact"]
    assert data_rows.parse_annotations('["a", "b"]') == ["a", "b"]
    assert data_rows.parse_annotations(np.array(["a", "b"], dtype=object)) == ["a", "b"]
    for bad in (
        {"info1": "a"},
        3,
        2.5,
        ["a", 1],
        "<info1>a</info1> stray text <info2>b</info2>",
        "<info1>unclosed",
    ):
        with pytest.raises(ValueError):
            data_rows.parse_annotations(bad)


def test_placeholder_and_instruction():
    assert data_prompts.remove_image_placeholders("<image>Find x.") == "Find x."
    assert (
        data_prompts.remove_image_placeholders("In <image> the figure, find x.\n<image>")
        == "In the figure, find x."
    )
    assert data_prompts.with_instruction("  Find x. ", "Do it.") == "Find x. Do it."
    assert data_prompts.with_instruction("Find x.", "") == "Find x."
    assert "\\boxed{}" in data_prompts.FORMAT_INSTRUCTION and data_prompts.FORMAT_INSTRUCTION.startswith(
        "You FIRST think"
    )


def test_prompt_building(tmp_path, processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(1))
    # The same picture in every accepted images form (a parquet column has one type, so one file per
    # form), with answers given as numbers or padded text.
    f1 = write(
        tmp_path / "structs.parquet",
        [
            {
                "problem": "<image>Find x.",
                "answer": 3,
                "images": [{"bytes": png(1), "path": "ignored.png"}],
                "visual_key_info": None,
            }
        ],
    )
    schema = pa.schema(
        [
            ("problem", pa.string()),
            ("answer", pa.float64()),
            ("images", pa.list_(pa.string())),
            ("visual_key_info", pa.string()),
        ]
    )
    f2 = write(
        tmp_path / "paths.parquet",
        [
            {"problem": "<image>Find x.", "answer": 2.5, "images": ["img/a.png"], "visual_key_info": None},
            {
                "problem": "Find x.<image>",
                "answer": 4.0,
                "images": [str(tmp_path / "img" / "a.png")],
                "visual_key_info": "",
            },
        ],
        schema,
    )
    f3 = write(
        tmp_path / "struct_path.parquet",
        [
            {
                "problem": "<image>Find x.",
                "answer": "  7 ",
                "images": {"bytes": None, "path": "img/a.png"},
                "visual_key_info": [],
            }
        ],
    )
    it = D.val_iterator(
        config(val_files=[f1, f2, f3], prompts_per_step=8), processor, process_index=0, process_count=1
    )
    (batch,) = list(it)
    assert [e.answer for e in batch] == ["3", "2.5", "4", "7"]
    assert [e.uid for e in batch] == [
        "structs.parquet:0",
        "paths.parquet:0",
        "paths.parquet:1",
        "struct_path.parquet:0",
    ]
    expected = np.asarray(Image.open(io.BytesIO(png(1))).convert("RGB"))
    for e in batch:
        assert len(e.images) == 1 and np.array_equal(e.images[0], expected)
        assert e.question == "Find x."
        assert e.prompt_question == "Find x. " + data_prompts.FORMAT_INSTRUCTION
        assert "<image>" not in e.prompt.text
        assert e.prompt.text.count(IMAGE_PAD) == 1
        assert e.prompt.text.index(IMAGE_PAD) < e.prompt.text.index("Find x.")
        grid = e.prompt.image_grid_thw
        assert grid.shape == (1, 3)
        n_image_tokens = int(np.sum(e.prompt.input_ids == processor.image_token_id))
        assert n_image_tokens == int(np.prod(grid)) // 4 > 0
        assert e.annotations == []


def test_annotation_columns_and_system_prompt(tmp_path, processor):
    lists = write(tmp_path / "lists.parquet", [row(0, visual_key_info=["AB = 5", "CD = 2"])])
    tags = write(
        tmp_path / "tags.parquet", [row(0, visual_key_info="<info1>AB = 5</info1><info2>CD = 2</info2>")]
    )
    cfg = config(val_files=[lists, tags], system_prompt="Be brief.", format_instruction="")
    (batch,) = list(D.val_iterator(cfg, processor, process_index=0, process_count=1))
    assert [e.annotations for e in batch] == [["AB = 5", "CD = 2"]] * 2
    assert all("Be brief." in e.prompt.text and e.prompt_question == e.question for e in batch)
    # No annotations column configured: empty annotations (the accuracy-only baseline's data).
    cfg = config(val_files=[lists], annotations_key="")
    (batch,) = list(D.val_iterator(cfg, processor, process_index=0, process_count=1))
    assert batch[0].annotations == []


# ---- order, sharding, resume ---------------------------------------------------------------------


def test_shuffle_is_deterministic_per_seed_and_epoch(twelve, processor):
    def epochs(seed, k=3):
        it = D.train_iterator(
            config(train_files=[twelve], seed=seed, prompts_per_step=4),
            processor,
            process_index=0,
            process_count=1,
        )
        batches = take(it, 3 * k)
        assert [b[0].epoch for b in batches] == [e for e in range(k) for _ in range(3)]
        return [sum(uids(batches[3 * e : 3 * e + 3]), []) for e in range(k)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b
    assert a != c
    assert len({tuple(e) for e in a}) == 3  # a new order every epoch
    for order in a + c:
        assert sorted(order) == sorted(f"twelve.parquet:{i}" for i in range(12))
    unshuffled = D.train_iterator(
        config(train_files=[twelve], shuffle=False, prompts_per_step=4),
        processor,
        process_index=0,
        process_count=1,
    )
    assert sum(uids(take(unshuffled, 3)), []) == [f"twelve.parquet:{i}" for i in range(12)]


@pytest.mark.parametrize("count", [2, 3, 5])
def test_sharding_is_disjoint_and_covering(twelve, processor, count):
    cfg = config(train_files=[twelve], val_files=[twelve], prompts_per_step=count)  # one per process
    train, val = [], []
    for p in range(count):
        it = D.train_iterator(cfg, processor, process_index=p, process_count=count)
        train.append(sum(uids(take(it, it.per_epoch)), []))  # this process's share of epoch 0
        assert next(it)[0].epoch == 1
        val.append(sum(uids(D.val_iterator(cfg, processor, process_index=p, process_count=count)), []))
    everything = sorted(f"twelve.parquet:{i}" for i in range(12))
    for shares in (train, val):
        flat = sum(shares, [])
        assert sorted(flat) == everything and len(set(flat)) == len(flat)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_resume_gives_the_same_batches(tmp_path, processor):
    rows = [row(i) for i in range(10)]
    rows[3] = row(
        3, images=[{"bytes": png(3)[:60], "path": None}]
    )  # header fine, pixels cut: skipped when met
    rows[7] = row(7, problem="<image>" + "many words here " * 60)  # filtered: too long
    data = write(tmp_path / "resume.parquet", rows)
    cfg = config(train_files=[data], prompts_per_step=3, skip_bad_rows=True, max_prompt_length=260)

    def fresh():
        return D.train_iterator(cfg, processor, process_index=0, process_count=1)

    straight = fresh()
    take(straight, 4)
    state = json.loads(json.dumps(straight.get_state()))  # plain JSON
    expected = uids(take(straight, 6))
    assert straight.epoch >= 2  # crossed epochs (8 usable rows)
    assert straight.stats["skipped_bad_rows"] >= 2 and straight.stats["filtered_too_long"] >= 2
    assert straight.stats["dropped_remainder"] > 0  # 8 usable rows, batches of 3

    resumed = fresh()
    resumed.set_state(state)
    assert uids(take(resumed, 6)) == expected
    assert resumed.stats == straight.stats and resumed.epoch == straight.epoch
    assert resumed.batches == straight.batches == 10

    gathered = D.gather_states(resumed)
    again = fresh()
    again.set_state(json.loads(json.dumps(gathered)))
    assert uids(take(again, 2)) == uids(take(resumed, 2))

    other_seed = D.train_iterator(
        config(train_files=[data], seed=1, skip_bad_rows=True), processor, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)
    two = D.train_iterator(
        config(train_files=[data], prompts_per_step=2, skip_bad_rows=True, max_prompt_length=260),
        processor,
        process_index=0,
        process_count=2,
    )
    with pytest.raises(ValueError, match="process_count"):
        two.set_state(state)


def test_long_prompts_are_filtered_and_counted(tmp_path, processor):
    rows = [row(i) for i in range(5)]
    rows[1] = row(1, problem="<image>" + "a long question " * 80)
    data = write(tmp_path / "long.parquet", rows)
    it = D.val_iterator(
        config(val_files=[data], max_prompt_length=260), processor, process_index=0, process_count=1
    )
    got = sum(uids(it), [])
    assert got == [f"long.parquet:{i}" for i in (0, 2, 3, 4)]
    assert it.stats["filtered_too_long"] == 1 and it.stats["examples"] == 4
    assert it.stats["skipped_bad_rows"] == 0


def test_pixel_limits_from_config(twelve, processor):
    cfg = config(val_files=[twelve], min_pixels=28 * 28, max_pixels=28 * 28)
    (e, *_), *_ = D.val_iterator(cfg, processor, process_index=0, process_count=1)
    assert e.prompt.image_grid_thw.tolist() == [[1, 2, 2]]
    assert processor.max_pixels != 28 * 28  # the shared processor is untouched


# ---- bad rows -----------------------------------------------------------------------------------


def _bad_images_struct(tmp_path):
    return [row(i) for i in range(2)] + [row(2, images=[{"bytes": b"\x89PNG garbage", "path": None}])]


BAD_ROWS = {
    # name: (rows builder or (rows, schema), field in the message, reason)
    "empty_problem": (lambda tmp: [row(0), row(1), row(2, problem="<image>  ")], "problem", "empty_problem"),
    "null_problem": (lambda tmp: [row(0), row(1), row(2, problem=None)], "problem", "empty_problem"),
    "null_answer": (lambda tmp: [row(0), row(1), row(2, answer=None)], "answer", "bad_answer"),
    "annotation_text_outside_tags": (
        lambda tmp: [row(0), row(1), row(2, visual_key_info="<info1>a</info1> and then <info2>b</info2>")],
        "visual_key_info",
        "bad_annotations",
    ),
    "annotation_dict": (
        lambda tmp: (
            [row(i, visual_key_info=None) for i in range(2)] + [row(2, visual_key_info={"a": "b"})],
            None,
        ),
        "visual_key_info",
        "bad_annotations",
    ),
    "annotation_number": (
        lambda tmp: (
            [row(i, visual_key_info=None) for i in range(2)] + [row(2, visual_key_info=5)],
            pa.schema(
                [
                    ("problem", pa.string()),
                    ("answer", pa.string()),
                    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                    ("visual_key_info", pa.int64()),
                ]
            ),
        ),
        "visual_key_info",
        "bad_annotations",
    ),
    "undecodable_image": (_bad_images_struct, "images[0]", "undecodable_image"),
    "missing_image_file": (
        lambda tmp: [row(0), row(1), row(2, images=[{"bytes": None, "path": "nowhere.png"}])],
        "images[0]",
        "missing_image",
    ),
    "image_without_bytes_or_path": (
        lambda tmp: [row(0), row(1), row(2, images=[{"bytes": None, "path": None}])],
        "images",
        "bad_images",
    ),
    "more_placeholders_than_images": (
        lambda tmp: [row(0), row(1), row(2, problem="<image><image>Two pictures?")],
        "problem",
        "image_count_mismatch",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_names_file_row_and_field(tmp_path, processor, case):
    build, field, reason = BAD_ROWS[case]
    built = build(tmp_path)
    rows, schema = built if isinstance(built, tuple) else (built, None)
    # Two good rows after the bad one, with annotations of the same type as the good rows before it.
    rows = rows + [row(i, visual_key_info=rows[0]["visual_key_info"]) for i in (3, 4)]
    path = write(tmp_path / f"{case}.parquet", rows, schema)

    with pytest.raises(data_rows.DataError) as info:
        list(D.val_iterator(config(val_files=[path]), processor, process_index=0, process_count=1))
    message = str(info.value)
    assert path in message and "row 2" in message and f"'{field}'" in message, message
    assert (info.value.row, info.value.field, info.value.reason) == (2, field, reason)

    it = D.val_iterator(
        config(val_files=[path], skip_bad_rows=True), processor, process_index=0, process_count=1
    )
    got = sum(uids(it), [])
    assert got == [f"{case}.parquet:{i}" for i in (0, 1, 3, 4)]
    assert it.stats["skipped_bad_rows"] == 1 and it.stats[f"bad_rows/{reason}"] == 1


def test_missing_column_is_an_error_at_open(tmp_path, processor):
    rows = [{k: v for k, v in row(i).items() if k != "visual_key_info"} for i in range(3)]
    path = write(tmp_path / "nocol.parquet", rows)
    for skip in (False, True):
        with pytest.raises(
            data_rows.DataError,
            match=r"nocol\.parquet: no column 'visual_key_info' \(config data\.annotations_key\)",
        ):
            D.val_iterator(
                config(val_files=[path], skip_bad_rows=skip), processor, process_index=0, process_count=1
            )
    cfg = config(val_files=[path], answer_key="solution")
    with pytest.raises(data_rows.DataError, match="no column 'solution'"):
        D.val_iterator(cfg, processor, process_index=0, process_count=1)


def test_bad_images_column_type_and_config_values(tmp_path, processor):
    path = write(tmp_path / "intimages.parquet", [row(0, images=[1, 2])])
    with pytest.raises(data_rows.DataError, match="column 'images' has type"):
        D.val_iterator(config(val_files=[path]), processor, process_index=0, process_count=1)
    for key, value in (
        ("prompts_per_step", 0),
        ("max_prompt_length", 0),
        ("max_pixels", -1),
        ("train_files", ["a.parquet", 3]),
    ):
        cfg = config(**{key: value})
        with pytest.raises(ValueError, match=rf"data\.{key}"):
            data_config_lib.check_data_config(cfg)
    few = write(tmp_path / "few.parquet", [row(i) for i in range(3)])
    with pytest.raises(ValueError, match="prompts_per_step"):
        D.train_iterator(
            config(train_files=[few], prompts_per_step=4), processor, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="prompts_per_step=3 does not split evenly over 2"):
        D.train_iterator(
            config(train_files=[few], prompts_per_step=3), processor, process_index=0, process_count=2
        )


def test_errors_surface_early_at_open(tmp_path, processor):
    # A bad cheap field in the last row fails the constructor, before any prompt is built.
    rows = [row(i) for i in range(20)] + [row(20, problem="")]
    path = write(tmp_path / "late.parquet", rows)
    with pytest.raises(data_rows.DataError, match="row 20"):
        D.train_iterator(config(train_files=[path]), processor, process_index=0, process_count=1)


def test_image_headers_are_checked_at_open(tmp_path, processor):
    """Format, size and aspect ratio come from the header when the file opens, before any prompt is
    built; a JPEG whose size sits past a large metadata block is still read (not a false alarm)."""
    wide = io.BytesIO()
    Image.new("RGB", (1000, 4), "red").save(wide, format="PNG")
    exif_heavy = io.BytesIO()
    Image.new("RGB", (56, 56), "blue").save(exif_heavy, format="JPEG", icc_profile=b"\0" * 100_000)
    cases = {
        "ratio": (wide.getvalue(), "unprocessable", "aspect ratio 250.0"),
        "junk": (b"\x89PNG\r\n\x1a\n but no chunks", "undecodable_image", "cannot decode"),
    }
    for name, (data, reason, message) in cases.items():
        rows = [row(0), row(1, images=[{"bytes": data, "path": None}])]
        path = write(tmp_path / f"{name}.parquet", rows)
        with pytest.raises(data_rows.DataError, match=message) as info:
            data_rows.ParquetRows([path], config())
        assert (info.value.path, info.value.row, info.value.field, info.value.reason) == (
            path,
            1,
            "images[0]",
            reason,
        )
        assert len(data_rows.ParquetRows([path], config(skip_bad_rows=True))) == 1
    path = write(tmp_path / "icc.parquet", [row(0, images=[{"bytes": exif_heavy.getvalue(), "path": None}])])
    assert len(exif_heavy.getvalue()) > 100_000 and len(data_rows.ParquetRows([path], config())) == 1


def test_rows_that_fail_to_decode_are_skipped_up_to_max_bad_rows(tmp_path, processor):
    """A truncated PNG passes the header check and fails when read: the row is skipped, counted and
    remembered (a resumed iterator does not decode it again); past data.max_bad_rows distinct rows
    the iterator stops with an error naming the file and every bad row."""
    rows = [row(i) for i in range(8)]
    for i in (2, 5, 6):
        rows[i] = row(i, images=[{"bytes": png(i)[:60], "path": None}])
    path = write(tmp_path / "cut.parquet", rows)
    cfg = config(train_files=[path], prompts_per_step=1, shuffle=False, max_bad_rows=3)
    it = D.train_iterator(cfg, processor, process_index=0, process_count=1)
    got = uids(take(it, 3))
    assert got == [["cut.parquet:0"], ["cut.parquet:1"], ["cut.parquet:3"]]
    assert it.stats["bad_rows"] == 1 and it.stats["bad_rows/undecodable_image"] == 1
    state = json.loads(json.dumps(it.get_state()))
    assert [b["uid"] for b in state["bad_rows"]] == ["cut.parquet:2"]

    # Resumed: rows 5 and 6 are met, then in epoch 1 row 2 again, known bad without decoding it.
    resumed = D.train_iterator(cfg, processor, process_index=0, process_count=1)
    resumed.set_state(state)
    decoded = []
    original = resumed.source.images
    resumed.source.images = lambda fi, r: decoded.append(r) or original(fi, r)
    assert sum(uids(take(resumed, 6)), []) == [f"cut.parquet:{i}" for i in (4, 7, 0, 1, 3, 4)]
    assert 2 not in decoded[decoded.index(7) :] and resumed.stats["bad_rows"] == 3
    assert resumed.stats["bad_rows/undecodable_image"] == resumed.stats["skipped_bad_rows"] == 4

    # One more bad row than allowed: an error naming the file and all the rows.
    strict = D.train_iterator(
        config(train_files=[path], prompts_per_step=1, shuffle=False, max_bad_rows=2),
        processor,
        process_index=0,
        process_count=1,
    )
    with pytest.raises(data_rows.DataError) as info:
        take(strict, 6)
    message = str(info.value)
    assert f"{path}: rows 2, 5, 6" in message and "data.max_bad_rows=2" in message, message
    assert "row 6: field 'images[0]'" in message
    # max_bad_rows=0: the first such row is the error, as it names it.
    with pytest.raises(
        data_rows.DataError, match=rf"^{re.escape(path)}: row 2: field 'images\[0\]': cannot decode"
    ):
        take(
            D.train_iterator(
                config(train_files=[path], prompts_per_step=1, shuffle=False, max_bad_rows=0),
                processor,
                process_index=0,
                process_count=1,
            ),
            3,
        )


def test_a_row_with_too_many_annotations_is_refused_naming_it(tmp_path, processor):
    many = "".join(f"<info{k}>fact {k}</info{k}>" for k in range(1, 201))
    path = write(tmp_path / "many.parquet", [row(0), row(1, visual_key_info=many)])
    with pytest.raises(
        data_rows.DataError, match=r"200 visual annotations, more than data\.max_annotations=64"
    ) as info:
        data_rows.ParquetRows([path], config())
    assert (info.value.row, info.value.field, info.value.reason) == (1, "visual_key_info", "bad_annotations")
    assert len(data_rows.ParquetRows([path], config(max_annotations=200))) == 2
