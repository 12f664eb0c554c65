"""What `make deploy` tells the template about the release it builds.

  release             the crate's version and the commit, as SemVer build metadata:
                      1.0.0+3f9c2a1b0d4e (`.dirty` after it when the work tree has changes)
  overrides ENV       samconfig.toml's parameter_overrides of ENV, then Release=<release>, one a
                      line, as they are (`sam deploy --parameter-overrides` replaces samconfig's
                      list rather than adding to it; the Makefile reads them with mapfile)

Each published Lambda version's description names the release (template.yaml, Release), so
`aws lambda get-function-configuration --function-name ...:live --query Description` shows which
commit `live` runs (docs/operations.md, "Releases").
"""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def release():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    git = ["git", "-C", ROOT]
    commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, check=True).stdout.strip()
    return f"{version}+{commit}{'.dirty' if dirty else ''}"


def overrides(env, config_path=os.path.join(ROOT, "samconfig.toml")):
    try:
        import tomllib as toml  # Python 3.11 and later
    except ImportError:
        import tomlkit as toml  # the SAM CLI's own TOML reader, in the venv with it
    with open(config_path) as f:
        config = toml.loads(f.read())
    listed = config[env]["deploy"]["parameters"]["parameter_overrides"]
    listed = shlex.split(listed) if isinstance(listed, str) else list(listed)
    return [str(p) for p in listed if not str(p).startswith("Release=")] + [f"Release={release()}"]


def main(argv):
    if argv[:1] == ["release"]:
        print(release())
    elif len(argv) == 2 and argv[0] == "overrides":
        print("\n".join(overrides(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
