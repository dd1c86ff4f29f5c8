"""``python -m mole_ds.eval tasks-dir``: print the bundled tasks folder (for lmms-eval's ``--include_path``)."""
import sys

from . import TASKS_DIR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["tasks-dir"]:
        print("usage: python -m mole_ds.eval tasks-dir", file=sys.stderr)
        return 2
    print(TASKS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
