"""Command-line error handling (sgjax.cli): user errors as one line and exit status 2."""

import ast
import glob
import os

import numpy as np
import pytest

from sgjax import cli
from sgjax.metrics import npz
from tests import helpers


def failing(error: BaseException):
  def main(argv):
    del argv
    raise error
  return main


@pytest.mark.parametrize("error", [
    ValueError("--num_samples=0 must be >= 1."), FileNotFoundError("--workdir='x': no such file."),
    FloatingPointError("3 of 8 samples hold NaN or inf.")])
def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(error, capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.guard(failing(error), prog="sgjax.sample")(["sgjax.sample"])
  assert exit_info.value.code == cli.EXIT_USER_ERROR == 2
  assert capsys.readouterr().err == f"sgjax.sample: error: {error}\n"


def test_a_message_on_several_lines_is_printed_on_one(capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit):
    cli.guard(failing(ValueError("keys differ:\n  unexpected: a\n\n  missing: b")), "p")([])
  assert capsys.readouterr().err == "p: error: keys differ: unexpected: a missing: b\n"


def test_unexpected_errors_and_exit_statuses_pass_through(capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(RuntimeError, match="a bug"):  # uncaught: Python prints its traceback
    cli.guard(failing(RuntimeError("a bug")), "p")([])
  with pytest.raises(SystemExit) as exit_info:  # train's preempted exit
    cli.guard(failing(SystemExit(75)), "p")([])
  assert exit_info.value.code == 75
  assert cli.guard(lambda argv: len(argv), "p")(["p", "x"]) == 2
  assert capsys.readouterr().err == ""


def test_sgjax_traceback_reraises_user_errors(monkeypatch):
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  with pytest.raises(ValueError, match="bad value"):
    cli.guard(failing(ValueError("bad value")), "p")([])


def test_every_entry_point_runs_through_cli():
  """Each module with a __main__ block ends in cli.run, none calls absl's app.run itself."""
  entry_points = []
  for path in glob.glob(os.path.join(helpers.ROOT, "sgjax", "**", "*.py"), recursive=True):
    with open(path) as f:
      tree = ast.parse(f.read())
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert "app.run" not in calls or path.endswith(os.path.join("sgjax", "cli.py")), path
    if any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
           for node in tree.body):
      assert "cli.run" in calls, path
      entry_points.append(os.path.basename(path))
  for name in ("train.py", "sample.py", "evaluate.py", "sweep.py", "report.py", "latents.py",
               "text_embed.py", "plan.py", "bench.py", "import_torch.py", "flops.py"):
    assert name in entry_points, name


def test_cli_run_names_the_module_and_keeps_tracebacks_of_bugs(tmp_path):
  """Through absl's app.run, in a process of its own (no JAX import: fast)."""
  (tmp_path / "tool.py").write_text(
      "import sys\nfrom sgjax import cli\n"
      "def main(argv):\n"
      "  if sys.argv[1:] == ['bug']:\n    raise RuntimeError('a bug')\n"
      "  raise FileNotFoundError('--data=x: no such file.')\n"
      "if __name__ == '__main__':\n  cli.run(main)\n")
  pythonpath = os.pathsep.join([str(tmp_path), helpers.ROOT])
  user = helpers.run_command("tool", PYTHONPATH=pythonpath)
  assert helpers.user_error_line(user, "tool") == "tool: error: --data=x: no such file."
  bug = helpers.run_command("tool", "bug", PYTHONPATH=pythonpath)
  assert bug.returncode == 1
  assert "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
  shown = helpers.run_command("tool", PYTHONPATH=pythonpath, SGJAX_TRACEBACK="1")
  assert shown.returncode == 1 and "Traceback" in shown.stderr


def test_evaluate_names_a_file_that_is_not_an_npz(tmp_path):
  text = tmp_path / "samples.txt"
  text.write_text("not an npz\n")
  result = helpers.run_command("sgjax.evaluate", f"--samples={text}", "--metric=digits")
  line = helpers.user_error_line(result, "sgjax.evaluate")
  assert f"--samples='{text}' is not an .npz file" in line and "uint8 images arr_0" in line
  assert not (tmp_path / "metrics.json").exists()
  # The same checks in-process: a reference that is no .npz, samples without images.
  with pytest.raises(ValueError, match=r"--reference=.*samples.txt' is not an .npz file"):
    npz.check_inputs("digits", str(text), None)
  np.savez(tmp_path / "labels.npz", labels=np.arange(3))
  with pytest.raises(ValueError, match=r"holds no images arr_0 \(it has \['labels'\]\)"):
    npz.evaluate_npz(str(tmp_path / "labels.npz"), metric="digits")
  with pytest.raises(FileNotFoundError, match="--samples=.*missing.npz'.*no such file"):
    npz.evaluate_npz(str(tmp_path / "missing.npz"), metric="digits")
