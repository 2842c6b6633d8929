"""The PostgreSQL schema: numbered migrations and views (one schema per deployment)."""
