"""Built-in recipes: YAML files read by :func:`compressor.recipe.load_recipe`."""
