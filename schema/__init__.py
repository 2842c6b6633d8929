"""The SQL schema, one folder per engine (``sqlite/``, ``postgresql/``): numbered migrations and views,
package data of coord."""
