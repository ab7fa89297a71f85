"""The service fixtures of tests/service, for the fault suite."""

from tests.service.conftest import make_service, svc, template_db, tiny_ckpt, tiny_dataset  # noqa: F401
