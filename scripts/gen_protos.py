"""Regenerate the Python code for protos/ into clients/python, or check it is current.

    python scripts/gen_protos.py          # write the generated modules
    python scripts/gen_protos.py --check  # exit 1 when the committed output is stale

Generated files are never edited by hand; change the .proto and run this.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python" / "src"
GENERATED_PACKAGE = Path("chatgate") / "v1"


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            sys.exit(f"gen_protos: {name} not found; install the dev dependencies (mypy-protobuf)")
        return found
    return str(path)


def generate(out_dir: Path, *, quiet: bool = False) -> list[Path]:
    """Run protoc into ``out_dir``. ``quiet``: mypy-protobuf's plugins do not list the
    files they write (its "Writing mypy to …" lines; --check has nothing to list)."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    mypy_options = "quiet:" if quiet else ""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={mypy_options}{out_dir}",
        f"--mypy_grpc_out={mypy_options}{out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        sys.exit("gen_protos: protoc failed")
    return sorted(p.relative_to(out_dir) for p in (out_dir / GENERATED_PACKAGE).glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        (fresh / GENERATED_PACKAGE).mkdir(parents=True)
        produced = generate(fresh, quiet=check)
        committed = sorted(p.relative_to(OUT_ROOT) for p in (OUT_ROOT / GENERATED_PACKAGE).glob("*_pb2*"))
        if check:
            stale = [
                str(p)
                for p in produced
                if not (OUT_ROOT / p).exists() or not filecmp.cmp(fresh / p, OUT_ROOT / p, shallow=False)
            ]
            stale += [str(p) for p in committed if p not in produced]
            if stale:
                print("generated code is stale; run: python scripts/gen_protos.py", *stale, sep="\n  ")
                return 1
            print(f"generated code is current ({len(produced)} files)")
            return 0
        for p in committed:
            if p not in produced:
                (OUT_ROOT / p).unlink()
        for p in produced:
            shutil.copyfile(fresh / p, OUT_ROOT / p)
        print(f"wrote {len(produced)} files under {OUT_ROOT / GENERATED_PACKAGE}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
