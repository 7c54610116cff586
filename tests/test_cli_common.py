"""The CLI's shared helpers: flags added to library errors, the redacted command line."""

from __future__ import annotations


def test_library_errors_name_config_keys_and_the_cli_adds_the_flags():
    from flowtame.cli._common import error_line, flag_for
    from flowtame.errors import InputError

    assert flag_for("batch_size") == "--batch-size" and flag_for("architecture") == "--arch"
    assert error_line(InputError("lr must be positive", keys=("lr",))) == "lr must be positive [--lr]"
    assert error_line(InputError("no such file")) == "no such file"


def test_redacted_command_hides_forget_sources_only():
    from flowtame.cli._common import redacted_command
    from flowtame.cli.tame import FORGET_OPTIONS

    argv = ["tame", "base.safetensors", "--forget", "/secret/a", "-f", "/secret/b", "--forget=/secret/c",
            "--remember", "embedded:digits:train", "-o", "out.safetensors"]
    assert redacted_command(argv, FORGET_OPTIONS) == (
        "flowtame tame base.safetensors --forget '<forget source>' -f '<forget source>' "
        "'--forget=<forget source>' --remember embedded:digits:train -o out.safetensors")
