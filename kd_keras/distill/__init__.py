"""Distillation: losses, the Distiller model, callbacks, optimizers, precision, tf.distribute,
teachers, ensembles, stages.
"""
