"""Drop-ins for other trainers: ``fusedrl.integrations.hf`` and ``fusedrl.integrations.trl``."""
