"""ichd_ray: intracranial hemorrhage detection on head CT as a distributed batch job on Ray."""

__version__ = "0.1.0"

#: The five RSNA subtypes plus ``any``, in the RSNA label order.
CLASSES: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)

#: Weights of the challenge metric (and of the training loss), in :data:`CLASSES` order: ``any`` x2.
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)
