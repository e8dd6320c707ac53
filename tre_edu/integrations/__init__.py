"""Thin adapters that put Trust Region Entropy into trainers people already use (:mod:`tre_edu.integrations.trl`:
TRL's ``GRPOTrainer``, imported on demand: ``import tre_edu`` never imports TRL). An adapter adds no algorithm of
its own: it calls :mod:`tre_edu.entropy` and maps settings and metrics into the host trainer's conventions. verl:
see README.md, "Use TRE in TRL", for the one function a verl user changes.
"""
