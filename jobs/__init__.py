"""Thin command-line entry points: ``python -m jobs.train | label | serve | evaluate | synth | demo``.

Each parses flags into the plain spec of its program (raytasks.train.TrainSpec, raytasks.label.LabelSpec,
raytasks.serve.ServeArgs) and calls it; nothing else lives here.
"""
