"""Pretraining and the Keras-style `fit`: data, schedules, distributed set-up, run folders, quickstart."""
