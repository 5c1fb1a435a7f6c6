"""The training parameters, beside the code that reads them.

``TrainingParams`` is declared in :mod:`recsys_serving.training_params` because
``Settings`` (in ``recsys_serving``) nests it; the training modules import it from here.
"""

from recsys_serving.training_params import (
    DEFAULT_EVENT_WEIGHTS,
    DEFAULT_LABEL_GRADES,
    TrainingParams,
)

__all__ = ["DEFAULT_EVENT_WEIGHTS", "DEFAULT_LABEL_GRADES", "TrainingParams"]
