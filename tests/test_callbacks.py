"""Training callbacks (`kd_keras.distill.callbacks`): best-epoch selection."""

import numpy as np


def test_best_epoch_is_chosen_with_the_evaluation_rule_and_ties_go_to_auc():
    """A model that ranks well but sits on one side of 0.5 (balanced accuracy 0.5 at argmax in
    every epoch) must not keep its worst epoch: selection uses the validation threshold."""
    import keras

    from kd_keras.distill.callbacks import SelectBest

    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    epochs = [  # P(class 1) per epoch: always >= 0.5 (argmax says "1"), ranking improves
        np.array([0.9, 0.6, 0.8, 0.7, 0.85, 0.6, 0.95, 0.9]),
        np.array([0.6, 0.65, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]),
        np.array([0.55, 0.6, 0.62, 0.8, 0.85, 0.9, 0.95, 0.99]),
    ]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])
    for tune, last_balanced_accuracy in ((False, 0.5), (True, 1.0)):
        select = SelectBest(
            model, None, y, ["a", "b"], "val_balanced_accuracy", tune_threshold=tune
        )
        for epoch, p in enumerate(epochs):
            select.predictor = lambda x, p=p: np.log(np.stack([1 - p, p], axis=1))
            select.val_ds = [np.zeros((8, 1))]
            logs = {}
            select.on_epoch_end(epoch, logs)
        # argmax: every epoch ties at 0.5 and AUC breaks the tie (then the later epoch);
        # the evaluation rule: epochs 2 and 3 separate the classes, the later one is kept
        assert logs["val_balanced_accuracy"] == last_balanced_accuracy
        assert select.best_epoch == 2, (tune, select.best_epoch)
