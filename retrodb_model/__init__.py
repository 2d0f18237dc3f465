"""The RETRO model that trains, evaluates and generates from a retrodb database."""
