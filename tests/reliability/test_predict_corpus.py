"""`jurassiglip predict` on what users actually give it: the bad-input corpus of the predict command.

Like the data stage's corpus (test_bad_data.py), each case is what a user
typed or had on disk, with the outcome they must get: an answer that is
right (and says what it could not read), or exit code 2 and one line naming
the flag, file or value, before the model runs, and no output folder. The
cases run the CLI's real main() in this process with the checkpoints the
micro pipeline trained (the reference run); `test_refusals_are_one_line_on_
stderr` runs some of them as the command itself, to show the stderr a user
sees. The rows of issue 15's table are marked `# issue 15:`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from jurassiglip.cli import main as cli
from jurassiglip.data.tokenizer import load_tokenizer

FINETUNED = "data/seg_finetune/checkpoints/best.safetensors"
PRETRAINED = "data/contrastive_pretrain/checkpoints/best.safetensors"
ABSENT = "data/seg_finetune/checkpoints/absent.safetensors"  # in the repository, so the flags' defaults are found


@pytest.fixture(scope="module")
def project(reference_run) -> Path:
    return reference_run.root


@pytest.fixture
def user(project, tmp_path, monkeypatch):
    """A user in a folder of their own with a photo: predict takes its defaults from the checkpoint's repository."""
    monkeypatch.chdir(tmp_path)
    scene(64, 48).save(tmp_path / "photo.png")
    return tmp_path


def scene(width: int, height: int) -> Image.Image:
    """A gradient with a red block in the top-left quarter: no two rows or columns alike."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (3 * x + 7 * y) % 256], axis=-1)
    rgb[: height // 3, : width // 4] = (220, 30, 30)
    return Image.fromarray(rgb.astype(np.uint8))


def predict(*args: str | Path, checkpoint: str | Path | None = None, project: Path | None = None) -> int:
    checkpoint = checkpoint if checkpoint is not None else project / FINETUNED
    return cli(["predict", *map(str, args), "--checkpoint", str(checkpoint), "--device", "cpu"])


def problems(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def refused(caplog, code: int, out: Path) -> str:
    """The refusal: exit code 2, exactly one logged line, no traceback, nothing written. Returns the line."""
    (record,) = problems(caplog)
    line = record.getMessage()
    assert code == 2 and "\n" not in line and record.exc_info is None, (code, line)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "output left behind"
    return line


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


# -- refused in one line, before the model runs ----------------------------------------------------------------

# flag and value as typed -> the line (issue 15: thresholds that made every mask empty or every caption no-target)
THRESHOLDS = [
    (["--mask-threshold", "5"], "--mask-threshold 5.0: must be a probability in (0, 1)"),
    (["--mask-threshold", "nan"], "--mask-threshold nan: must be a probability in (0, 1)"),
    (["--mask-threshold", "0"], "--mask-threshold 0.0: must be a probability in (0, 1)"),
    (["--no-target-threshold", "-1"], "--no-target-threshold -1.0: must be a probability in (0, 1)"),
    (["--no-target-threshold", "inf"], "--no-target-threshold inf: must be a probability in (0, 1)"),
    (["--no-target-min-area", "1"], "--no-target-min-area 1.0: must be a fraction in [0, 1)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", THRESHOLDS, ids=[" ".join(f) for f, _ in THRESHOLDS])
def test_a_threshold_out_of_range_is_refused(project, user, caplog, flags, message):
    code = predict("--image", "photo.png", "--text", "the red square", "--out", "out", *flags, project=project)
    assert refused(caplog, code, user / "out") == message


@pytest.mark.slow
def test_an_existing_file_as_out_is_refused_and_kept(project, user, caplog):  # issue 15
    (user / "notes.txt").write_text("mine")
    code = predict("--image", "photo.png", "--text", "x", "--out", "notes.txt", project=project)
    (record,) = problems(caplog)
    assert code == 2 and record.getMessage() == ("--out notes.txt: exists and is not a folder; "
                                                 "give a folder to write the predictions into")
    assert (user / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_folder_holding_other_files_is_not_replaced(project, user, caplog):
    (user / "holiday").mkdir()
    (user / "holiday" / "beach.jpg").write_bytes(b"a photo")
    code = predict("--image", "photo.png", "--text", "x", "--out", "holiday", project=project)
    (record,) = problems(caplog)
    assert code == 2 and record.getMessage().startswith("--out holiday: holds files predict did not write (beach.jpg)")
    assert (user / "holiday" / "beach.jpg").read_bytes() == b"a photo"


@pytest.mark.slow
def test_the_current_folder_as_out_is_refused(project, user, caplog):
    code = predict("--image", "photo.png", "--text", "x", "--out", ".", project=project)
    (record,) = problems(caplog)
    assert code == 2
    assert record.getMessage() == "--out .: is the current folder or one above it; give a folder of its own"
    assert (user / "photo.png").is_file()


@contextmanager
def unwritable(folder: Path):
    """`folder` refuses new entries, whoever runs the tests (permission bits do not stop root; chattr +i does)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a folder unwritable for root")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and chattr +i is not permitted here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.slow
def test_an_unwritable_place_is_refused_before_the_checkpoint_is_read(project, user, caplog):  # issue 15
    (user / "shared").mkdir()
    with unwritable(user / "shared"):
        # a checkpoint that does not exist: had it been read first, the line would name it
        code = predict("--image", "photo.png", "--text", "x", "--out", "shared/out", checkpoint=project / ABSENT)
    line = refused(caplog, code, user / "shared" / "out")
    assert line.startswith(f"--out shared/out: cannot create a folder in {user / 'shared'} (")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: `--device cuda` is valid here")
def test_cuda_without_cuda_is_refused_before_the_checkpoint_is_read(project, user, caplog):  # issue 15
    code = cli(["predict", "--image", "photo.png", "--text", "x", "--out", "out", "--device", "cuda",
                "--checkpoint", str(project / ABSENT)])
    assert refused(caplog, code, user / "out").startswith("device 'cuda': ")


@pytest.mark.slow
@pytest.mark.parametrize("device, message", [
    ("gpu", "device 'gpu' is not a torch device: use cpu, cuda or cuda:<index>"),
    ("cuda:99", "device 'cuda:99': "),
])
def test_a_device_this_machine_lacks_is_refused(project, user, caplog, device, message):
    code = cli(["predict", "--image", "photo.png", "--text", "x", "--out", "out", "--device", device,
                "--checkpoint", str(project / ABSENT)])
    assert refused(caplog, code, user / "out").startswith(message)


@pytest.mark.slow
@pytest.mark.parametrize("name, content, message", [
    ("missing.png", None, "missing.png: image not found"),
    ("broken.jpg", b"\xff\xd8 not really a jpeg", "broken.jpg: cannot read the image ("),
    ("empty.png", b"", "empty.png: cannot read the image ("),
])
def test_an_image_that_cannot_be_read_is_refused_naming_it(project, user, caplog, name, content, message):
    if content is not None:
        (user / name).write_bytes(content)
    code = predict("--image", name, "--text", "x", "--out", "out", project=project)
    assert refused(caplog, code, user / "out").startswith(message)


@pytest.mark.slow
@pytest.mark.parametrize("caption", ["", "  \t "])
def test_an_empty_caption_is_refused(project, user, caplog, caption):
    code = predict("--image", "photo.png", "--text", "the red square", "--text", caption, "--out", "out",
                   project=project)
    assert refused(caplog, code, user / "out") == "empty caption: give a non-empty --text"


def untrained_no_target_head(project: Path, repo: Path) -> Path:
    """The reference checkpoint as a `finetune.no_target_weight: 0` run writes it (the head marked untrained),
    in a copy of the repository's params.yaml and dvc.yaml."""
    path = repo / FINETUNED
    path.parent.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(project / name, repo / name)
    with safe_open(project / FINETUNED, framework="pt") as stored:
        metadata = stored.metadata()
        tensors = {key: stored.get_tensor(key) for key in stored.keys()}
    document = json.loads(metadata["jurassiglip"])
    document["heads"]["no_target"] = False
    save_file(tensors, path, metadata={"jurassiglip": json.dumps(document, sort_keys=True)})
    return path


@pytest.mark.slow
def test_checkpoints_that_cannot_answer_are_refused(project, user, caplog):  # issue 15
    # stage 1's checkpoint: its segmentation head never trained (it gave a full-image mask, exit 0)
    code = predict("--image", "photo.png", "--text", "x", "--out", "out", checkpoint=project / PRETRAINED)
    assert refused(caplog, code, user / "out") == (
        f"{project / PRETRAINED} was written by contrastive_pretrain: its segmentation head is untrained; "
        f"use data/seg_finetune/checkpoints/best.safetensors")
    caplog.clear()
    # a no-target head trained with weight 0, asked to decide (it gave random verdicts, exit 0) ...
    weightless = untrained_no_target_head(project, user / "repo")
    code = predict("--image", "photo.png", "--text", "x", "--out", "out", "--no-target-rule", "head",
                   checkpoint=weightless)
    assert refused(caplog, code, user / "out") == (
        f"{weightless} has an untrained no-target head (trained with finetune.no_target_weight 0): "
        f"use --no-target-rule area (evaluate.no_target_rule: area in params.yaml)")
    # ... is fine under the area rule
    assert predict("--image", "photo.png", "--text", "the red square", "--out", "out", "--no-target-rule", "area",
                   checkpoint=weightless) == 0
    caplog.clear()
    # a path that is not there (the format-1 name of issue 15's table)
    code = predict("--image", "photo.png", "--text", "x", "--out", "out2",
                   checkpoint=project / "data/contrastive_pretrain/checkpoints/best.pt")
    assert refused(caplog, code, user / "out2").startswith(
        f"{project / 'data/contrastive_pretrain/checkpoints/best.pt'}: checkpoint not found")


@pytest.mark.slow
def test_refusals_are_one_line_on_stderr(project, user):
    """As the command itself: stderr holds the one line and nothing else (no traceback, no usage block)."""
    cases = [
        (["--mask-threshold", "5"], "--mask-threshold 5.0: must be a probability in (0, 1)"),
        (["--mask-threshold", "abc"],
         "jurassiglip predict: error: argument --mask-threshold: invalid float value: 'abc' "
         "(see jurassiglip predict --help)"),
        (["--checkpoint", str(project / PRETRAINED)], "its segmentation head is untrained"),
    ]
    for flags, message in cases:
        result = subprocess.run([sys.executable, "-m", "jurassiglip.cli", "predict", "--image", "photo.png",
                                 "--text", "x", "--out", "out", "--device", "cpu",
                                 "--checkpoint", str(project / FINETUNED), *flags],
                                cwd=user, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.endswith(message) if message.startswith("--") else message in line, line
        assert not (user / "out").exists()


# -- answers that say what they could not read --------------------------------------------------------------


@pytest.mark.slow
def test_a_photo_with_exif_orientation_is_read_upright(project, user, caplog):  # issue 15
    """A phone's portrait photo: a 64x48 landscape bitmap tagged "rotate 90° clockwise" (orientation 6).

    The mask must be the one of the upright picture (48 wide, 64 high), the
    same as for the upright pixels saved without a tag.
    """
    stored = np.asarray(scene(64, 48))  # (48, 64, 3): stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(user / "portrait.png", exif=exif.tobytes())
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(user / "upright.png")  # turned 90° clockwise by hand
    with caplog.at_level(logging.INFO):
        for name in ("portrait", "upright"):
            assert predict("--image", f"{name}.png", "--text", "the red square", "--text", "all blue shapes",
                           "--out", name, project=project) == 0
    assert "portrait.png: EXIF orientation 6 applied" in caplog.text
    for a, b in zip(lines(user / "portrait"), lines(user / "upright")):
        tagged, by_hand = (np.asarray(Image.open(user / folder / a["mask"])) for folder in ("portrait", "upright"))
        assert tagged.shape == (64, 48)  # (H, W): upright
        assert np.array_equal(tagged, by_hand) and a["area"] == b["area"]


@pytest.mark.slow
def test_captions_with_unknown_words_are_flagged(project, user, caplog):  # issue 15
    vocabulary = load_tokenizer(project / "data/build_manifest/tokenizer").get_vocab()
    assert "the" in vocabulary and "zorgle" not in vocabulary and "🦖🦖" not in vocabulary
    with caplog.at_level(logging.WARNING):
        assert predict("--image", "photo.png", "--text", "🦖🦖", "--text", "the zorgle", "--text", "the",
                       "--out", "out", project=project) == 0
    dinos, zorgle, known = lines(user / "out")
    assert dinos["unknown_words"] == ["🦖🦖"] and dinos["warnings"][0].startswith(
        "no known word: the tokenizer knows none of its words ('🦖🦖')")
    assert zorgle["unknown_words"] == ["zorgle"] and zorgle["warnings"] == ["unknown words, read as <unk>: 'zorgle'"]
    assert known["unknown_words"] == [] and known["warnings"] == []
    logged = [r.getMessage() for r in problems(caplog)]
    assert logged == [f"caption '🦖🦖': {dinos['warnings'][0]}", "caption 'the zorgle': unknown words, read as "
                      "<unk>: 'zorgle'"]


@pytest.mark.slow
def test_a_caption_longer_than_the_model_reads_is_flagged(project, user):
    assert predict("--image", "photo.png", "--text", "the " * 40, "--out", "out", project=project) == 0
    (line,) = lines(user / "out")
    assert line["warnings"] == ["longer than the 12 tokens the model reads: the rest is ignored"]  # text_max_len 12


# -- the output folder is written as a whole ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_with_fewer_captions_leaves_no_stale_files(project, user):  # issue 15
    old_umask = os.umask(0o022)
    try:
        assert predict("--image", "photo.png", "--text", "a", "--text", "b", "--text", "c", "--out", "out",
                       project=project) == 0
        assert predict("--image", "photo.png", "--text", "the red square", "--out", "out", project=project) == 0
    finally:
        os.umask(old_umask)
    (line,) = lines(user / "out")
    assert sorted(p.name for p in (user / "out").iterdir()) == sorted(
        ["predictions.jsonl", line["mask"], line["overlay"]])
    assert stat.S_IMODE((user / "out").stat().st_mode) == 0o755  # umask 022, as mkdir gives
    assert {stat.S_IMODE(p.stat().st_mode) for p in (user / "out").iterdir()} == {0o644}
    assert sorted(p.name for p in user.iterdir()) == ["out", "photo.png"]  # no temporary folder left


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_write_that_fails_midway_leaves_the_previous_output_as_it_was(project, user):  # issue 15
    """A file-size limit the masks fit under but not the overlays: the write fails after caption 1's mask."""
    y, x = np.mgrid[0:400, 0:600]
    noisy = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    noisy[(x // 100 + y // 100) % 2 == 0] = 255  # a mask with straight edges, an overlay of noise
    Image.fromarray(noisy).save(user / "big.png")
    assert predict("--image", "photo.png", "--text", "the red square", "--out", "out", project=project) == 0
    before = {p.name: p.read_bytes() for p in (user / "out").iterdir()}
    result = subprocess.run([sys.executable, "-m", "jurassiglip.cli", "predict", "--image", "big.png",
                             "--text", "the red square", "--text", "all blue shapes", "--out", "out",
                             "--checkpoint", str(project / FINETUNED), "--device", "cpu"],
                            cwd=user, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size(64 * 1024))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"cannot write the predictions to out \(\[Errno 27\] File too large.*\); it was left as it was",
                     errors[0]), errors[0]
    assert {p.name: p.read_bytes() for p in (user / "out").iterdir()} == before
    assert sorted(p.name for p in user.iterdir()) == ["big.png", "out", "photo.png"]  # no temporary folder left
