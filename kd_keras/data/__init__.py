"""Data: sources (npz/MedMNIST, image folders, CSV, CIFAR-10), image files, checks, augmentation,
pipelines.
"""
