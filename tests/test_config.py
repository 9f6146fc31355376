"""The typed config: YAML and flags fill one model; every refused value is one line, exit 2."""

import json
import re
import subprocess
import typing
from pathlib import Path

import pytest

import tunelab
from clirun import run_cli
from tunelab.cli import build_parser, config_flags
from tunelab.config import DataOptions, TrainConfig
from tunelab.data import load as data
from tunelab.errors import UserError
from tunelab.train.checkpoint import fingerprint


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"COLUMNS": "1000"})  # help lines unwrapped, one per option


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single `tunelab: error:` line of a refused command."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: "), result.stderr
    return lines[0]


@pytest.fixture
def rows(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])


@pytest.mark.parametrize("yaml_text, expected", [
    # 1e-3 is a string to PyYAML; it is accepted, so the only complaint is the other key.
    ("lr: 1e-3\nbatch_size: 0\n", "batch_size: 0 must be greater than 0"),
    ('compile: "yes"\n', "compile: 'yes' must be true or false"),
    ("epoch: 2\n", "unknown option 'epoch' (did you mean 'epochs'?)"),
    ("epochs: two\n", "epochs: 'two' must be a number"),
    ("test_size: 1.5\n", "test_size: 1.5 must be a fraction in [0, 1) or a whole count >= 1"),
    ("format: json\n",
     "format: 'json' must be 'auto', 'messages', 'prompt_completion', 'alpaca', 'text' or 'preference'"),
    ("max_steps: true\n", "max_steps: true must be a number, not true or false"),
    ("batch_size:\n", "batch_size: null must be a whole number"),
    ("- lr: 0.1\n", "expected a mapping of option names to values"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_a_bad_yaml_value_is_one_line_naming_file_key_value_and_what_is_allowed(tmp_path, rows, yaml_text, expected):
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    line = one_error(cli("train", str(rows), "--config", str(config), "--out", str(tmp_path / "run")))
    assert line.startswith(f"tunelab: error: {config}")
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_line(tmp_path, rows):
    line = one_error(cli("train", str(rows), "--config", str(tmp_path / "nope.yaml")))
    assert line == f"tunelab: error: {tmp_path / 'nope.yaml'}: config file not found"


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "abc"], "--lr abc: must be a number"),
    (["--test-size", "1.5"], "--test-size 1.5: must be a fraction in [0, 1) or a whole count >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be greater than 0"),
    (["--method", "qlora"], "--method qlora: must be 'lora' or 'full'"),
    (["--max-length", "4"], "--max-length 4: must be greater than or equal to 8"),
])
def test_a_bad_flag_value_is_one_line(tmp_path, rows, flags, expected):
    assert one_error(cli("train", str(rows), *flags)) == f"tunelab: error: {expected}"


def test_a_flag_is_named_as_a_flag_even_over_a_yaml_file(tmp_path, rows):
    config = tmp_path / "train.yaml"
    config.write_text("batch_size: 4\n")
    assert one_error(cli("train", str(rows), "--config", str(config), "--epochs", "0")) == \
        "tunelab: error: --epochs 0: must be greater than 0"


def test_yaml_numbers_and_test_sizes_are_coerced(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 5E-4\nepochs: 2\nbatch-size: '4'\ntest_size: 5\n")
    loaded = TrainConfig.from_yaml(config)
    assert loaded.lr == 0.001 and loaded.weight_decay == 0.0005 and loaded.batch_size == 4
    assert type(loaded.epochs) is float and loaded.epochs == 2.0
    assert loaded.test_size == 5
    assert TrainConfig.build(test_size="0.2").test_size == 0.2
    assert TrainConfig.build(test_size=0).test_size == 0


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("max_steps: 5\nbatch_size: 4\n")
    args = build_parser().parse_args(["train", "d.jsonl", "--config", str(config), "--max-steps", "300", "--compile"])
    loaded = TrainConfig.from_yaml(config, **config_flags(args, TrainConfig))
    assert (loaded.max_steps, loaded.batch_size, loaded.compile, loaded.epochs) == (300, 4, True, 1.0)


def test_fingerprint_is_stable_across_a_save_and_load(tmp_path, rows):
    config = TrainConfig.build(lr="1e-3", epochs=2, test_size=5, max_steps="7")
    config.save(tmp_path / "config.yaml")
    loaded = TrainConfig.from_yaml(tmp_path / "config.yaml")
    assert loaded == config
    assert fingerprint(loaded, rows) == fingerprint(config, rows)
    assert loaded.learning_rate == 0.001
    assert TrainConfig(method="full").learning_rate == 1e-4


def test_python_api_refuses_a_bad_option_before_loading_a_model(tmp_path, rows):
    with pytest.raises(UserError, match=r"^batch_size=0: must be greater than 0$"):
        tunelab.finetune(rows, out=tmp_path / "run", base=str(tmp_path / "no-model"), batch_size=0)
    with pytest.raises(UserError, match=r"unknown option 'lora_rnak' \(did you mean 'lora_rank'\?\)"):
        tunelab.finetune(rows, out=tmp_path / "run", lora_rnak=4)
    assert not (tmp_path / "run").exists()


def test_every_refused_value_is_listed_one_per_line():
    with pytest.raises(UserError) as refused:
        TrainConfig.build(source="t.yaml", batch_size=0, keep=0)
    assert refused.value.lines() == ["t.yaml: batch_size: 0 must be greater than 0",
                                     "t.yaml: keep: 0 must be greater than 0"]


def help_entries(text: str) -> dict[str, str]:
    """`--flag` -> its help line (COLUMNS is wide, so each entry is one or two lines)."""
    entries, flag = {}, None
    for line in text.splitlines():
        found = re.match(r"  (--[\w-]+)", line)
        if found:
            flag = found.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += line
    return entries


def test_train_help_prints_each_default_once():
    result = cli("train", "--help")
    assert result.returncode == 0
    entries = help_entries(result.stdout)
    for name, field in TrainConfig.model_fields.items():
        entry = entries["--" + name.replace("_", "-")]
        assert entry.count("default") <= 1, entry
        if isinstance(field.default, bool):
            assert entry.endswith(f"(default: {'on' if field.default else 'off'})"), entry
        elif field.default is not None:
            assert entry.count(f"(default: {field.default})") == 1, entry
    assert "default: None" not in result.stdout and "SUPPRESS" not in result.stdout
    assert "--format {auto," + ",".join(data.SHAPES) + "}" in result.stdout


def test_data_check_flags_come_from_the_data_options(tmp_path, rows):
    check = cli("data", "check", "--help")
    flags = set(help_entries(check.stdout))
    assert flags == {"--" + name.replace("_", "-") for name in DataOptions.model_fields} | {"--base", "--out"}
    assert one_error(cli("data", "check", str(rows), "--test-size", "1.5")) == \
        "tunelab: error: --test-size 1.5: must be a fraction in [0, 1) or a whole count >= 1"
    result = cli("data", "check", str(rows), "--test-size", "5", "--seed", "3", "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "data_check.json").read_text())
    assert report["options"] == DataOptions(test_size=5, seed=3).model_dump()
    assert report["split"]["test"] == 5


def commands():
    """(words, Command) of every sub-command, `data check` as ("data", "check")."""
    from tunelab.cli import COMMANDS, CommandGroup

    for name, command in COMMANDS.items():
        if isinstance(command, CommandGroup):
            yield from (((name, sub), c) for sub, c in command.commands.items())
        else:
            yield (name,), command


def is_positional(field) -> bool:
    return any(getattr(m, "positional", False) for m in field.metadata)


def is_flag(field) -> bool:
    """Not a value only the Python API sets (`Arg(flag=False)`)."""
    return all(getattr(m, "flag", True) for m in field.metadata)


@pytest.mark.parametrize("words, command", list(commands()), ids=[" ".join(w) for w, _ in commands()])
def test_every_command_takes_its_flags_and_defaults_from_one_options_model(words, command, capsys):
    """Every field is an argument and every flag a field; what argparse leaves out, the model fills."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    entries = help_entries(capsys.readouterr().out)
    fields = {**command.options.model_fields, **(command.config.model_fields if command.config else {})}
    assert set(entries) - {"--help"} == {"--" + n.replace("_", "-") for n, f in fields.items()
                                             if not is_positional(f) and is_flag(f)}
    # Only the required arguments given: every other value is the model's default.
    argv, required = [*words], {}
    for name, field in command.options.model_fields.items():
        if field.is_required():
            required[name] = "3" if field.annotation is int else "x"
            argv += [required[name]] if is_positional(field) else ["--" + name.replace("_", "-"), required[name]]
    options = command.options.build(**config_flags(build_parser().parse_args(argv), command.options))
    for name, field in command.options.model_fields.items():
        if not is_flag(field):
            continue
        expected = field.default if name not in required else \
            [required[name]] if typing.get_origin(field.annotation) is list else int(required[name]) \
            if field.annotation is int else required[name]
        value = getattr(options, name)
        if name in required:  # a path given on the command line arrives as a Path
            value = [str(v) for v in value] if isinstance(value, list) \
                else str(value) if isinstance(value, Path) else value
        assert value == expected, name


def test_a_command_option_refused_by_its_model_is_named_as_its_flag(tmp_path):
    from tunelab.cli import EvalOptions

    with pytest.raises(UserError, match=r"^--shots -1: must be greater than or equal to 0$"):
        EvalOptions.build(flags={"shots"}, run="r", shots="-1")
    assert EvalOptions.build(run="r", shots="2", precision="bf16").shots == 2
    assert one_error(cli("serve", str(tmp_path), "--port", "70000")) == \
        "tunelab: error: --port 70000: must be less than or equal to 65535"


def test_a_flag_is_never_abbreviated(tmp_path, rows):
    assert one_error(cli("train", str(rows), "--epoch", "2")) == \
        "tunelab: error: tunelab train: unrecognized arguments: --epoch 2; see `tunelab train --help`"
