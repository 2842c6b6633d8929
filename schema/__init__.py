"""The SQL schema: numbered migrations and views, package data of coord."""
