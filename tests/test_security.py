"""Security: credentials never land in results or output, stores from elsewhere run no code,
and grids run on a TLS-secured Dask cluster.

The PostgreSQL tests need ``STUDY_TEST_POSTGRES_SECRET_URL`` (a role whose password the
server checks; ``.ci/postgres.sh`` makes one) and skip without it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study import redact, store

ROOT = Path(__file__).resolve().parents[1]
ENVMODS = ROOT / "tests" / "envmods"
SECRET_URL = os.environ.get("STUDY_TEST_POSTGRES_SECRET_URL")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STUDY_OPTUNA_STORAGE", "STUDY_TEST_MARKER")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ENVMODS)])
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, timeout=300)


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


# --------------------------------------------------------------------------------------
# redaction


@pytest.mark.parametrize(("text", "secret"), [
    ("postgresql://alice:hunter2-pw@db.example:5432/optuna", "hunter2-pw"),
    ("postgresql+psycopg2://alice:p%40ss%2Fword@db/optuna?sslmode=require", "p%40ss%2Fword"),
    ("mysql://bob:we@ird/pw@host/db", "we@ird/pw"),
    ("--storage 'postgresql://u:tops3cret@h/db' failed", "tops3cret"),
    ("postgresql://h/db?user=u&password=tops3cret&sslmode=require", "tops3cret"),
    ("host=h dbname=db user=u password=tops3cret", "tops3cret"),
    ('{"command": "x --storage=postgresql://u:tops3cret@h/db"}', "tops3cret"),
])
def test_redact_masks_passwords_by_shape(text, secret):
    out = redact.redact(text)
    assert secret not in out and redact.MASK in out
    assert "sslmode=require" in out or "sslmode" not in text  # the rest is kept


def test_redact_keeps_texts_without_credentials():
    for text in ("tcp://127.0.0.1:8786", "postgresql://alice@db/optuna", "file:///tmp/x",
                 "sqlite:///results/a.db", "bypass = 3", "results/quickstart"):
        assert redact.redact(text) == text


def test_registered_secret_is_masked_anywhere_in_both_encodings():
    redact.register_secret("p%40ss-" + uuid.uuid4().hex[:8])
    raw = sorted(s for s in redact._SECRETS if s.startswith("p%40ss-"))[-1]
    decoded = raw.replace("%40", "@")
    text = f"driver said: bad password {decoded!r} (encoded {raw})"
    out = redact.redact(text)
    assert raw not in out and decoded not in out and out.count(redact.MASK) == 2


CRASHING_CLI = """
import sys
from study import redact
from study.cli_util import run_cli
secret = sys.argv[1]
redact.register_secret(secret)

def body(argv):
    print(f"connecting to postgresql://u:{secret}@h/db")
    try:
        raise OSError(f"lost connection (password was {secret})")
    except OSError as e:
        raise RuntimeError("the study failed") from e

raise SystemExit(run_cli(body, None))
"""


def test_cli_output_and_unexpected_tracebacks_are_redacted(tmp_path):
    secret = "tb-" + uuid.uuid4().hex[:10]
    proc = subprocess.run([sys.executable, "-c", CRASHING_CLI, secret], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert secret not in proc.stdout + proc.stderr
    assert "connecting to postgresql://u:***@h/db" in proc.stdout
    # the whole chained traceback is still there, only the secret is masked
    assert "OSError: lost connection (password was ***)" in proc.stderr
    assert "RuntimeError: the study failed" in proc.stderr


def test_manifest_is_redacted_history_included(tmp_path):
    url = "postgresql://u:m4nifest-pw@h/db"
    manifest = {"format": store.FORMAT, "command": f"python -m study.optuna s.toml "
                f"--storage {url}", "history": [{"command": f"--storage={url}"}]}
    store.write_manifest(tmp_path, manifest)
    text = (tmp_path / store.MANIFEST).read_text()
    assert "m4nifest-pw" not in text and text.count("u:***@h/db") == 2


# --------------------------------------------------------------------------------------
# PostgreSQL with a password-protected role, for real

OPTUNA_SWEEP = """\
name = "sec"
env = "CartPole-v1"
total_steps = 400
log_every = 200
seeds = [1, 2, 3, 4]
[hyperparameters]
num_envs = 2
policy_hidden_sizes = [8]
value_hidden_sizes = [8]
[optuna]
n_trials = {n}
seeds_per_trial = 2
trials_per_batch = 2
[optuna.space]
policy_lr = {{ low = 1e-4, high = 1e-1, log = true }}
"""


@pytest.mark.skipif(not SECRET_URL, reason="STUDY_TEST_POSTGRES_SECRET_URL is not set")
def test_a_postgresql_password_never_reaches_files_or_output(tmp_path):
    assert SECRET_URL is not None
    password = SECRET_URL.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    name = f"sec-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    sweep = tmp_path / "sec.toml"
    outputs: list[bytes] = []

    def run(args: list[str], expect: int, **env: str) -> str:
        proc = _run(args, tmp_path, **env)
        outputs.extend([proc.stdout, proc.stderr])
        assert proc.returncode == expect, proc.stderr.decode()[-3000:]
        return proc.stderr.decode()

    # 1. the URL on the command line (as ps would show it), 2 trials
    sweep.write_text(OPTUNA_SWEEP.format(n=2))
    run(["study.optuna", str(sweep), "--out", str(out), "--study-name", name,
         "--storage", SECRET_URL], 0)
    # 2. resumed with the URL from the environment only, sslmode passed to the driver
    sweep.write_text(OPTUNA_SWEEP.format(n=4))
    err = run(["study.optuna", str(sweep), "--out", str(out), "--study-name", name], 0,
              STUDY_OPTUNA_STORAGE=SECRET_URL + "?sslmode=disable")
    assert "study_secret:***@" in err
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and (trials["study_name"] == name).all()
    # sslmode reaches psycopg2: this server has no SSL, so "require" must fail
    err = run(["study.optuna", str(sweep), "--out", str(out), "--study-name", name], 2,
              STUDY_OPTUNA_STORAGE=SECRET_URL + "?sslmode=require")
    assert "SSL" in err and len(err.strip().splitlines()) == 1
    # 3. its report, and a failed connection (wrong password)
    run(["study.report", str(out)], 0)
    wrong = SECRET_URL.replace(password, password[::-1])
    err = run(["study.optuna", str(sweep), "--out", str(tmp_path / "other"),
               "--storage", wrong], 2)
    assert "password authentication failed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()
    # 4. a resume that forgets the storage would start a second study: refused
    err = run(["study.optuna", str(sweep), "--out", str(out), "--study-name", name], 2)
    assert "study_secret:***@" in err and "STUDY_OPTUNA_STORAGE" in err

    manifest = json.loads((out / store.MANIFEST).read_text())
    assert manifest["optuna"]["storage"].startswith("postgresql")
    assert "study_secret:***@" in manifest["optuna"]["storage"]
    assert "--storage" in manifest["history"][0]["command"]  # recorded, redacted
    for what in (password, password[::-1]):
        assert _files_holding(tmp_path, what.encode()) == []
        assert not any(what.encode() in o for o in outputs)

    import optuna

    from study.sweeps.optuna import _check_storage
    optuna.delete_study(study_name=name, storage=_check_storage(SECRET_URL))


# --------------------------------------------------------------------------------------
# stores from elsewhere

MARKER_SWEEP = """\
name = "marker"
env = "marker_env:Marker-v0"
total_steps = 1600
log_every = 400
seeds = [0, 1, 2]
save_policies = true
[hyperparameters]
num_envs = 4
[grid]
policy_lr = [0.01, 0.001]
"""


@pytest.fixture(scope="module")
def marker_store(tmp_path_factory):
    """A grid store whose env is ``marker_env:Marker-v0`` (a module of tests/envmods),
    made under key ``mine``; importing the module appends to ``$STUDY_TEST_MARKER``."""
    tmp = tmp_path_factory.mktemp("marker")
    (tmp / "m.toml").write_text(MARKER_SWEEP)
    marker = tmp / "made.txt"
    proc = _run(["study.grid", "m.toml", "--out", "out", "--n-jobs", "2",
                 "--population-size", "3", "--quiet"], tmp,
                STUDY_KEY_FILE=str(tmp / "mine"), STUDY_TEST_MARKER=str(marker))
    assert proc.returncode == 0, proc.stderr.decode()
    # The sweep file named it, so the driver imported it, and so did the worker processes
    # that built the two populations' environments.
    assert len(set(marker.read_text().split())) >= 2
    manifest = json.loads((tmp / "out" / store.MANIFEST).read_text())
    assert len(manifest["env_signature"]) == 64
    return tmp


def test_readers_never_import_the_module_a_store_names(marker_store, tmp_path):
    marker = tmp_path / "imported.txt"
    out = marker_store / "out"
    for cmd in (["study.tables", str(out)], ["study.failures", str(out)],
                ["study.report", str(out), "--out", str(tmp_path / "report")]):
        proc = _run(cmd, tmp_path, STUDY_TEST_MARKER=str(marker),
                    STUDY_KEY_FILE=str(marker_store / "mine"))
        assert proc.returncode == 0, proc.stderr.decode()
        assert not marker.exists(), f"{cmd[0]} imported marker_env"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "agents filmstrip not drawn: the env 'marker_env:Marker-v0' imports" in md


def test_render_imports_a_store_module_only_when_made_here_or_trusted(marker_store, tmp_path):
    out = marker_store / "out"
    run_id = str(store.load_runs(out)["run_id"].iloc[0])
    marker = tmp_path / "imported.txt"
    png = tmp_path / "a.png"
    args = ["study.render", str(out), "--run", run_id, "--out", str(png)]

    # made elsewhere (another user's key, or none at all): refused, nothing imported
    for key in ("theirs", "missing/none"):
        proc = _run(args, tmp_path, STUDY_KEY_FILE=str(tmp_path / key),
                    STUDY_TEST_MARKER=str(marker))
        err = proc.stderr.decode().strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert "'marker_env'" in err and "--trust" in err
        assert not marker.exists() and not png.exists()
    # a forged signature does not help
    forged = tmp_path / "forged"
    import shutil
    shutil.copytree(out, forged)
    manifest = json.loads((forged / store.MANIFEST).read_text())
    manifest["env_signature"] = "0" * 64
    (forged / store.MANIFEST).write_text(json.dumps(manifest))
    proc = _run(["study.render", str(forged), "--run", run_id, "--out", str(png)], tmp_path,
                STUDY_KEY_FILE=str(marker_store / "mine"), STUDY_TEST_MARKER=str(marker))
    assert proc.returncode == 2 and not marker.exists()

    # with --trust, or made here (the key it was signed with): it draws
    proc = _run([*args, "--trust"], tmp_path, STUDY_KEY_FILE=str(tmp_path / "theirs"),
                STUDY_TEST_MARKER=str(marker))
    assert proc.returncode == 0, proc.stderr.decode()
    assert marker.exists() and png.stat().st_size > 0
    png.unlink()
    proc = _run(args, tmp_path, STUDY_KEY_FILE=str(marker_store / "mine"))
    assert proc.returncode == 0, proc.stderr.decode()
    assert png.stat().st_size > 0


class _TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def test_saved_policies_are_plain_arrays_never_unpickled(marker_store, tmp_path):
    out = tmp_path / "store"
    import shutil
    shutil.copytree(marker_store / "out", out)
    run_id = str(store.load_runs(out)["run_id"].iloc[0])
    touched = tmp_path / "unpickled.txt"
    evil = np.empty(1, dtype=object)
    evil[0] = _TouchOnUnpickle(touched)
    buf = io.BytesIO()
    np.savez(buf, **{"pi.0": evil})
    (out / store.POLICIES_DIR / f"{run_id}.npz").write_bytes(buf.getvalue())
    assert pickle.loads(pickle.dumps(evil[0])) is None and touched.exists()  # it would
    touched.unlink()
    proc = _run(["study.render", str(out), "--run", run_id, "--out",
                 str(tmp_path / "x.png"), "--trust"], tmp_path)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and "unreadable saved policy" in err and "pickle" in err
    assert len(err.splitlines()) == 1 and not touched.exists()


# --------------------------------------------------------------------------------------
# a TLS-secured Dask cluster

GRID = """\
name = "tls"
env = "CartPole-v1"
total_steps = 800
log_every = 200
seeds = [3, 4]
[hyperparameters]
num_envs = 4
[grid]
policy_lr = [0.01, 0.001]
"""


def _stored(out: Path) -> pd.DataFrame:
    runs, curves = store.load(out)
    curves = curves.sort_values(["run_id", "step"]).reset_index(drop=True)
    return curves.drop(columns=[c for c in curves.columns if "time" in c or "wall" in c])


def test_grid_on_a_tls_scheduler(tmp_path):
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("cryptography")
    from distributed.security import Security

    sec = Security.temporary()  # a self-signed CA and certificate, in memory
    for name, pem in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert),
                      ("key.pem", sec.tls_client_key)):
        (tmp_path / name).write_text(pem)
    tls = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tmp_path / "ca.pem"),
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tmp_path / "cert.pem"),
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tmp_path / "key.pem"),
           "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    (tmp_path / "g.toml").write_text(GRID)
    proc = _run(["study.grid", "g.toml", "--out", "inline", "--n-jobs", "1", "--quiet"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", protocol="tls", security=sec,
                                  dashboard_address=":0") as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        # without the client's certificates, or over plain tcp: one line, nothing written
        for addr, env in ((address, {}), (address.replace("tls://", "tcp://"), tls)):
            proc = _run(["study.grid", "g.toml", "--out", "refused", "--scheduler", addr],
                        tmp_path, **env)
            err = proc.stderr.decode().strip()
            assert proc.returncode == 2 and len(err.splitlines()) == 1, err
            assert "cannot connect" in err and "distributed.comm.tls" in err
            assert not (tmp_path / "refused").exists()
        proc = _run(["study.grid", "g.toml", "--out", "tls", "--scheduler", address,
                     "--quiet"], tmp_path, **tls)
        assert proc.returncode == 0, proc.stderr.decode()
    pd.testing.assert_frame_equal(_stored(tmp_path / "tls"), _stored(tmp_path / "inline"))
    assert json.loads((tmp_path / "tls" / store.MANIFEST).read_text())["backend"] == "dask"
