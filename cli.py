"""`python cli.py ...`: the same commands as the installed `kd-keras` console script."""

from kd_keras.cli import main

if __name__ == "__main__":
    main()
