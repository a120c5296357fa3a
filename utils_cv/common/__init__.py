"""Device, seeding, downloads and results recording."""
