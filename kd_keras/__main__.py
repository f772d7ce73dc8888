"""`python -m kd_keras ...`: the same commands as the `kd-keras` console script."""

from kd_keras.cli import main

if __name__ == "__main__":
    main()
