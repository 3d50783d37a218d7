from fundus_pipeline.console import main

main()
