"""What a run shows and publishes: its model card and the Hub push (above what they read: recipes, measuring)."""
