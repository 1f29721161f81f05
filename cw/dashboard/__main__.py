"""``python -m cw.dashboard``: the same program as ``cw dashboard``."""
import sys


def main(argv=None, prog: str = "python -m cw.dashboard") -> int:
    try:
        from cw.dashboard import app
    except ImportError as exc:
        print(f"cw.dashboard: {exc.name or exc} is not installed; install the dashboard's extra: "
              'pip install "cluster-workers[dashboard]"', file=sys.stderr)
        return 2
    return app.main(argv, prog)


if __name__ == "__main__":
    sys.exit(main())
