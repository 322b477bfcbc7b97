"""The `megatune` dispatcher's exit codes (README "Exit codes"): 2 for a usage error, 0 for help."""

import subprocess
import sys


def megatune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatune.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_usage_errors_exit_2_and_help_exits_0():
    assert megatune().returncode == 2
    unknown = megatune("finetune")
    assert unknown.returncode == 2 and "unknown command 'finetune'" in unknown.stderr
    assert megatune("--help").returncode == 0
    bad_flag = megatune("sft", "--learning_rat", "1")
    assert bad_flag.returncode == 2 and bad_flag.stderr.startswith("megatune sft: error: ")
