"""The SQL schema, one folder per engine (``sqlite/``): numbered migrations and views,
package data of coord."""
