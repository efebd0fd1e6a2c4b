"""Ray and MLflow as wheels for the GPU box (issue 16), small enough to travel with the checkout.

The box runs Python 3.12 on x86_64, has torch, numpy, pandas, pyarrow, aiohttp, ... but neither Ray nor MLflow,
and no network: what it lacks travels in `.whl/` (ignored by git), and a call carries at most 64 MiB with the
checkout (~14 MiB). So: resolve the closure of requirements/cpu.txt's ray[default,train,data] and mlflow pins,
download the wheels the box does not already have, cut from them what the job never runs there, and pack them
into one xz archive. Even cut, the wheels are 64 MiB as zip files (Ray's gcs_server, raylet and _raylet.so are
32 MiB deflated); one xz stream over the uncompressed wheels shares what those three binaries have in common.

    python benchmarks/gpu_wheels.py                  # here: .whl/wheels.tar.xz and .whl/manifest.json (~4 min)
    python3 benchmarks/gpu_wheels.py --install /tmp/site   # on the box, then PYTHONPATH=/tmp/site
"""
import argparse
import base64
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")]
# Those of the closure that the box's image already holds ("Python packages already there", 2026-11-17).
ON_BOX = set("""aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 idna jinja2 joblib kiwisolver markupsafe
matplotlib msgpack multidict narwhals numpy packaging pandas pillow prometheus-client propcache protobuf pyarrow
pyparsing python-dateutil pyyaml requests scikit-learn scipy six threadpoolctl typing-extensions urllib3 werkzeug
wrapt yarl zipp""".split())
# Files the job never needs on the box (a local head, `ray job submit`, one Ray Train worker, `mlflow server`).
CUT = {
    "ray": ["ray/jars/*",                     # the Java workers' jar (31 MiB): Python jobs only
            "ray/dashboard/client/build/*.map",  # the dashboard page's source maps (the page itself must stay)
            "ray/rllib/*", "ray/llm/*",       # libraries the job does not import
            "ray/_private/runtime_env/agent/thirdparty_files/*"],  # the agent's own aiohttp: the box has one
    "mlflow": ["mlflow/server/js/build/*"],   # the web UI (7 MiB); the REST API and /health work without it
    "virtualenv": ["virtualenv/seed/wheels/*"],  # bundled pip/setuptools: runtime envs with pip are not used
}
SAME_AS = {"mlflow-skinny": "mlflow", "mlflow-tracing": "mlflow"}  # every file of theirs is in mlflow's wheel


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins():
    """requirements/cpu.txt's `name==version` lines, extras dropped (pip's constraints take none)."""
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements/cpu.txt").read_text().splitlines())
    return {norm(re.sub(r"\[.*\]", "", line.split("==")[0])): line for line in lines if "==" in line}


def resolve(work):
    """The closure of ray[default,train,data] and mlflow at the pinned versions, as pip resolves it for the box."""
    pinned = pins()
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(re.sub(r"\[.*\]", "", line) for line in pinned.values()) + "\n")
    report = work / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                    "--target", str(work / "unused"), "--report", str(report), "-c", str(constraints), *TARGET,
                    pinned["ray"], pinned["mlflow"]], check=True)
    return {norm(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def record_of(z):
    """The wheel's own RECORD (Ray also holds vendored packages' dist-info folders deeper down)."""
    return next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))


def hashes(wheel):
    with zipfile.ZipFile(wheel) as z:
        record = record_of(z)
        return {line.split(",")[0]: line.split(",")[1] for line in z.read(record).decode().splitlines() if line}


def rewrite(wheel, out, drop):
    """Copy `wheel` to `out` without the files `drop(name)` selects, with a RECORD that lists what is left."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:  # xz compresses
        record = record_of(src)
        lines = []
        for info in src.infolist():
            if info.filename == record or info.is_dir() or drop(info.filename):
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            lines.append(record_line(info.filename, data))
        dst.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")


def install(archive, site):
    """On the box: unpack the wheels and install them offline into `site`, as they are (no dependencies)."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *map(str, Path(tmp).glob("*.whl"))],
                       check=True)


def build(out, budget_mib):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wanted = {name: version for name, version in resolve(work).items() if name not in ON_BOX}
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(work / "dl"),
                        *TARGET, *(f"{name}=={version}" for name, version in sorted(wanted.items()))], check=True)
        downloaded = {norm(w.name.split("-")[0]): w for w in (work / "dl").glob("*.whl")}
        assert downloaded.keys() == wanted.keys(), sorted(downloaded.keys() ^ wanted.keys())
        (work / "cut").mkdir()
        rows = []
        for name, wheel in sorted(downloaded.items()):
            cut = work / "cut" / wheel.name
            if name in SAME_AS:  # keep only the metadata (pip and importlib.metadata still see the package)
                kept = hashes(downloaded[SAME_AS[name]])
                own = hashes(wheel)
                rewrite(wheel, cut, lambda f: ".dist-info/" not in f and kept.get(f) == own[f])
            else:
                rewrite(wheel, cut, lambda f: any(fnmatch.fnmatch(f, p) for p in CUT.get(name, ())))
            rows.append((wheel.name, wheel.stat().st_size, cut.stat().st_size))
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        archive = out / "wheels.tar.xz"
        with tarfile.open(archive, "w:xz", preset=9) as tar:  # a 64 MiB window: gcs_server and raylet share code
            for wheel in sorted((work / "cut").iterdir()):
                tar.add(wheel, arcname=wheel.name)
    mib = 2 ** 20
    width = max(len(r[0]) for r in rows)
    print(f"{'wheel':<{width}} {'MiB as downloaded':>17} {'after the cuts (unpacked)':>25}")
    for wheel, before, after in sorted(rows, key=lambda r: -r[1]):
        print(f"{wheel:<{width}} {before / mib:17.2f} {after / mib:25.2f}")
    total = archive.stat().st_size
    print(f"{len(rows)} wheels: {sum(r[1] for r in rows) / mib:.2f} MiB as downloaded, "
          f"{sum(r[2] for r in rows) / mib:.2f} MiB after the cuts unpacked, {archive.name}: {total / mib:.2f} MiB")
    (out / "manifest.json").write_text(json.dumps(
        {"archive": archive.name, "bytes": total, "cut": CUT, "metadata_only": SAME_AS,
         "wheels": [{"wheel": w, "bytes_downloaded": b, "bytes_after_cuts": a} for w, b, a in rows]}, indent=1) + "\n")
    if total > budget_mib * mib:
        sys.exit(f"gpu_wheels: {archive} is {total / mib:.1f} MiB, over the budget of {budget_mib} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--budget-mib", type=float, default=46.0,
                        help="64 MiB a call, less the tracked checkout (~14 MiB) and some room")
    parser.add_argument("--install", metavar="SITE", help="install the archive in --out into SITE (on the box)")
    args = parser.parse_args()
    if args.install:
        install(args.out / "wheels.tar.xz", args.install)
    else:
        build(args.out, args.budget_mib)


if __name__ == "__main__":
    main()
