"""`python -m sim …` (`feedloop simulate …` hands its arguments here)."""
import argparse
import logging

from sim import simulate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="feedloop simulate", description=simulate.__doc__.split("\n\n")[0])
    simulate.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    simulate.main(args)


if __name__ == "__main__":
    main()
