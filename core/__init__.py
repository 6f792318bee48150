"""The product without Ray: one way from image bytes to rows, and the training loop's steps.

Used alike by the label job, the serving replicas, ``jobs.evaluate`` and the training workers.
"""
