"""Write drawn faces with known labels in a dataset's own format.

    python -m jobs.synth --format celeba --n 1000 --out /tmp/synth_celeba --seed 0 [--size 178x218]

See :mod:`facedata.synth` for what is drawn and how each label is set.
"""

from facedata.synth import main

if __name__ == "__main__":
    main()
