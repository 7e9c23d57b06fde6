"""The app catalogue, like ``monailabel apps``: list the apps in sample-apps.json or copy one out.

    python -m lib.apps --list
    python -m lib.apps --download --name revseg --output ./my_apps
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lib.paths import REPO_ROOT

CATALOGUE = REPO_ROOT / "sample-apps.json"


def load_catalogue(path: Path = CATALOGUE) -> list[dict]:
    return list(json.loads(path.read_text())["apps"])


def find_app(name: str, path: Path = CATALOGUE) -> dict:
    apps = {app["name"]: app for app in load_catalogue(path)}
    if name not in apps:
        raise KeyError(f"no app named {name!r} in {path}; available: {', '.join(sorted(apps))}")
    return apps[name]


def copy_app(name: str, output: Path, path: Path = CATALOGUE) -> Path:
    """Copy the app folder (wiring) to ``output/name`` with a README of its default --conf flags.

    The app imports lib/ and model/ from this repository (its main.py puts the repository on
    sys.path), so the copy stays a thin, editable front end to one installed revseg.
    """
    app = find_app(name, path)
    target = Path(output) / name
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another --output")
    shutil.copytree(REPO_ROOT / app["path"], target, ignore=shutil.ignore_patterns("logs", "__pycache__"))
    main = target / "main.py"
    main.write_text(main.read_text().replace(
        "REPO_ROOT = Path(__file__).resolve().parents[2]", f"REPO_ROOT = Path({str(REPO_ROOT)!r})"))
    conf = " ".join(f"--conf {k} {v}" for k, v in app["conf"].items())
    command = f"monailabel start_server --app {target} --studies STUDIES {conf}"
    (target / "README.md").write_text(f"# {name}\n\n{app['description']}\n\n```bash\n{command}\n```\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the apps")
    parser.add_argument("--download", action="store_true", help="copy an app out")
    parser.add_argument("--name", default="revseg")
    parser.add_argument("--output", type=Path, default=Path("apps_copy"))
    args = parser.parse_args(argv)
    try:
        if args.download:
            print(copy_app(args.name, args.output))
        else:
            for app in load_catalogue():
                print(f"{app['name']:<10} {app['path']:<14} models: {', '.join(app['models'])}  {app['description']}")
    except (KeyError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
