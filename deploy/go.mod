module github.com/migtun/migtun/deploy

go 1.26.8
