from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvdd.cli import build_parser, main
from cvdd.models import list_models

SUBCOMMANDS = [
    "squeeze",
    "recover",
    "relabel",
    "evaluate",
    "distill",
    "prior",
    "bench",
    "export",
    "info",
    "models",
    "presets",
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: cvdd" in capsys.readouterr().out


def test_parser_knows_every_subcommand() -> None:
    text = build_parser().format_help()
    assert all(c in text for c in SUBCOMMANDS)


def test_python_m_cvdd_version() -> None:
    out = subprocess.run([sys.executable, "-m", "cvdd", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cvdd ")


def test_help_and_version_do_not_import_torch() -> None:
    """`cvdd --help` answers at once: PyTorch (about 3 s to import here) is loaded by the commands that use it."""
    code = (
        "import sys\n"
        "from cvdd.cli import main\n"
        "for argv in (['--help'], ['--version'], ['squeeze', '--help'], ['distill', '--help'], ['bench', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: cvdd" in out.stdout and out.stdout.rstrip().endswith("torch imported: False")


def test_models_lists_every_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    assert "MFLOPs" in out


def test_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10-cpu" in out and "digits" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["squeeze", "--dataset", "/no/such/folder", "--out", "{tmp}"], "dataset path does not exist: /no/such/folder"),
        (["squeeze", "--dataset", "mnist", "--out", "{tmp}"], "unknown dataset 'mnist'"),
        (["squeeze", "--arch", "resnet9000", "--out", "{tmp}"], "unknown architecture 'resnet9000'"),
        (["squeeze", "--preset", "nope", "--out", "{tmp}"], "unknown squeeze preset 'nope'"),
        (["squeeze", "--set", "epochs=many", "--out", "{tmp}"], "expected an integer"),
        (["squeeze", "--device", "cuda:7", "--out", "{tmp}", "--epochs", "1"], "cuda"),
    ],
)
def test_bad_input_is_one_line_error(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device exists here")
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvdd: error: ") and message in err and "\n" not in err


def test_squeeze_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["squeeze", "--arch", "convnet_d3_w32", "--epochs", "2", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "convnet_d3_w32" in out and "%" in out
    assert (tmp_path / "convnet_d3_w32.safetensors").is_file()


@pytest.mark.parametrize(("value", "bars"), [(None, True), ("1", False), ("true", False), ("0", True)])
def test_tqdm_disable_turns_off_the_progress_bars_but_not_the_logs(
    value: str | None, bars: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvdd.cli import _setup_logging

    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    args = build_parser().parse_args(["models"])
    assert _setup_logging(args) is bars
    import logging

    assert logging.getLogger().level == logging.INFO  # only --quiet silences the logs


def test_cli_hides_torchs_no_cuda_notice_unless_verbose() -> None:
    """A CUDA build of PyTorch on a CPU-only machine logs "No CUDA runtime is found" when recover compiles its
    experts; the CLI drops that one message (it is harmless) and keeps every other, and -v shows it again."""
    import argparse
    import logging

    from cvdd.cli import _setup_logging

    torch_ext = logging.getLogger("torch.utils.cpp_extension")

    def shown(message: str) -> bool:
        return torch_ext.filter(torch_ext.makeRecord(torch_ext.name, logging.WARNING, "f", 1, message, (), None))

    _setup_logging(argparse.Namespace(verbose=False, quiet=False))
    _setup_logging(argparse.Namespace(verbose=False, quiet=False))  # main() may run many times in one process
    assert not shown("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    assert shown("some other warning")
    _setup_logging(argparse.Namespace(verbose=True, quiet=False))
    assert shown("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
    _setup_logging(argparse.Namespace(verbose=False, quiet=False))


def test_stage_overrides_split_distill_and_bench_sets_by_stage() -> None:
    from cvdd.cli import stage_overrides

    got = stage_overrides(["epochs=30", "evaluate.lr=0.01", "recover.iterations=500", "squeeze.epochs=10"])
    assert got == {"squeeze": {"epochs": 10}, "recover": {"iterations": 500}, "evaluate": {"epochs": 30, "lr": 0.01}}
    assert stage_overrides([]) == {"squeeze": {}, "recover": {}, "evaluate": {}}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("relabel.epochs=3", "--set relabel.epochs: unknown stage 'relabel'; write squeeze.KEY, recover.KEY"),
        ("recover.=3", "--set recover.: unknown stage 'recover'"),
        (
            "recover.ipc=5",
            "recover option 'ipc': the pipeline (per method and IPC) sets it itself, from the preset's IPCs (--ipc",
        ),
        (
            "recover.committee_size=3",
            "recover option 'committee_size': the pipeline (per method and IPC) sets it itself",
        ),
        ("recover.iteratons=5", "recover options: unknown key 'iteratons'"),
        ("squeeze.epochs=many", "squeeze options"),
    ],
)
def test_distill_rejects_a_bad_stage_setting_before_any_work(
    setting: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), "--set", setting, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvdd: error: ") and message in err and "\n" not in err
    assert not (out / "experts").exists()  # refused before squeeze started


def test_a_named_preset_is_checked_before_the_dataset_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --preset, a bad setting is named before the dataset is decoded (which takes minutes for CIFAR)."""
    missing = tmp_path / "no-such-data.tar.gz"
    args = ["bench", "--preset", "cifar10-ipc10", "--data", str(missing), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*args, "--set", "squeeze.epochz=8"]) == 2
    assert "squeeze options: unknown key 'epochz'" in capsys.readouterr().err
    assert main([*args, "--methods", "cvdd", "--set", "recover.iterations=5"]) == 2  # good settings: then the data
    assert "dataset path does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "merge", "export", "info", "models", "presets"])
def test_commands_that_compute_nothing_do_not_take_seed_device_or_track(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Accepted and ignored would suggest they change something; argparse refuses them instead (exit 2).
    help_text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert "--seed" not in help_text and "--device" not in help_text and "--track" not in help_text
    with pytest.raises(SystemExit) as exc:
        positional = {"models": [], "presets": [], "export": ["x", "--out", "y"]}.get(command, ["x"])
        main([command, *positional, "--seed", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --seed" in capsys.readouterr().err


def test_commands_that_compute_keep_seed_and_device() -> None:
    choices = build_parser()._subparsers._group_actions[0].choices
    for command in ("squeeze", "recover", "relabel", "evaluate", "distill", "prior", "ablate", "bench"):
        help_text = choices[command].format_help()
        assert "--seed" in help_text and "--device" in help_text, command
