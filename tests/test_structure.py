"""The package's structure as a user meets it: ``import revcolv2`` (what a timm user does to
register the presets) loads the model side only."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_revcolv2_registers_the_presets_without_the_run_folder_or_detectron2():
    # torch and timm first: the standard library's subprocess, which torch imports, imports
    # fcntl on POSIX; after dropping it from sys.modules, only our import could bring it back
    code = ("import sys, torch, timm\n"
            "sys.modules.pop('fcntl', None)\n"
            "import revcolv2\n"
            "assert 'revcolv2_tiny' in timm.list_models('revcolv2*'), timm.list_models('revcolv2*')\n"
            "print(sorted(m for m in ('fcntl', 'detectron2', 'revcolv2.run_dir') if m in sys.modules))\n")
    assert _python(code) == "[]"


def _python(code: str) -> str:
    """The last line that ``code`` prints, run in a fresh interpreter on this checkout."""
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "projects", "RevColV2"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]
