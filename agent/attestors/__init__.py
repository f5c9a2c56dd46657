"""attestors."""
