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
