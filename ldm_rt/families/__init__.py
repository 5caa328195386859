"""Model families: each folder owns one family (see DESIGN.md, Families)."""
